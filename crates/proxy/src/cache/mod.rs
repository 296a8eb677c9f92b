//! The proxy's persistent object cache.
//!
//! It keeps revisions fetched from upstream, each with its validity interval, across
//! restarts, so that a restarted proxy only catches up on what changed upstream (by tid and
//! oid) instead of downloading its working set again. It also keeps the invalidation log
//! (tid → oids) that lets the proxy answer `getInvalidations` for its own downstream
//! clients across its restarts.
//!
//! # Layout
//! ```text
//! DIR/index.redb          redb database: the index, last tid, invalidation log (index.rs)
//! DIR/segments/N.seg      append-only data files (segment.rs)
//! DIR/index.redb.bad      an index that could not be opened, set aside (at most one)
//! ```
//! Object data lives in segments of `clamp(max_bytes / 32, 1 MiB, 256 MiB)` bytes (at most
//! `max_bytes / 4`). Each record carries its oid, start tid and a crc32, so a record checks
//! itself on every read. The index maps each cached revision to its record: `current`
//! (oid → start, …) for revisions current as of `last_tid`, `noncurrent` ((oid, start) →
//! end, …) for revisions with a known end, and `locations` ((seg, off) → (oid, start)) so
//! eviction finds a segment's entries without reading the segment. Nothing at open walks
//! data or index: it reads a few meta keys, lists and stats the segment files and skips
//! through `locations` once per segment, so opening takes about as long for 20 GB as for
//! 20 MB (redb's `quick_repair`, set on every durable commit, spares it a full repair after
//! a crash). RAM use is bounded independently of the data size: the redb page cache
//! (`max_bytes / 64`, 16–256 MiB), the second-chance marks (≤ 2 M) and the recent
//! invalidations (≤ 256 Ki oids).
//!
//! # Crash safety
//! Two rules:
//! 1. Every change to the index and `last_tid` is a redb transaction; an invalidation is
//!    applied to the entries, appended to the log and moves `last_tid` in *one*
//!    transaction. Most commits are `Durability::None` (visible at once, not yet durable);
//!    [`Cache::flush`], eviction and close make a durable commit, which persists every
//!    commit before it. After a crash, redb reopens at the last durable commit: a state the
//!    cache actually passed through, never a mixture.
//! 2. Before a durable commit, every segment written since the last one is `fdatasync`ed
//!    (and the segments directory, if a segment was created). A durable index entry
//!    therefore never points at data that a power loss can take away. Segment files are
//!    deleted only after a durable commit that no longer mentions them, and segment numbers
//!    are never reused. A record that is still unreadable (disk damage, a truncated file)
//!    fails its crc/oid/tid check, is reported as a miss and its entry is dropped.
//!
//! Every state the cache passes through satisfies this invariant, with `L` its `last_tid`:
//! *a current entry of the current generation with start `s ≤ L` is current at `L`; one
//! with `s > L` was current as of some upstream tid ≥ `s` (an upstream answer that had
//! seen more than the cache had applied); a non-current entry `[s, e)` is the revision
//! that was current for all of `[s, e)`.* Stores keep it, because a revision is cached as
//! current only if no invalidation after the answer's `seen` tid has been applied (the
//! `RecentInvalidations` window; older answers are refused). Invalidations keep it:
//! `invalidate(t)` ends entries with `s < t` at `t` exactly and keeps those with `s ≥ t`
//! (they already reflect `t`); `invalidate_many(t)`, which only knows that the oids
//! changed somewhere in `(L, t]`, ends entries with `s ≤ L` at `L + 1` (all that is known),
//! drops those with `L < s < t` and keeps those with `s ≥ t`; `drop_current(t)` retires the
//! whole current generation at `L + 1` without touching it (see `index::Epochs`).
//! Eviction and relocation only remove entries or move identical bytes. So the durable
//! state after a crash, being one of these states, is correct as of its `last_tid`: an
//! entry stored as current at upstream tid `Y` with the durable `last_tid X < Y` is
//! either still current at `X`, or has `s > X` and is ended (or harmlessly dropped) by the
//! catch-up replay of the upstream transactions after `X` — which includes the one that
//! superseded it. `load_before(oid, X + 1)` after any crash returns exactly the revision
//! current at `X`, or nothing.
//!
//! If applying an invalidation fails (disk full, I/O error), the cache can no longer tell
//! which of its entries are current: it *poisons* itself, answers every load with a miss
//! and refuses to flush. The durable state on disk is still consistent, so a restart
//! recovers.
//!
//! # Eviction
//! FIFO over segments with a second chance (a log-structured CLOCK): when the segments
//! would exceed `max_bytes`, the oldest segment is evicted whole. Its entries are found in
//! `locations`; those read since they were written (or last copied) are copied forward
//! into the active segment and keep their index entry, the others are dropped. Then a
//! durable commit, then the file is deleted. Records bigger than a segment or than
//! `max_bytes / 4` are not cached. `max_bytes` bounds the segment files; the index comes on
//! top (about 125 bytes per cached revision in the benchmark).
//!
//! # Concurrency and blocking
//! `Cache` is `Send + Sync`. Loads take a redb read snapshot and do one positioned read;
//! they never wait for writers (a load that finds a damaged record takes the writer lock to
//! drop its entry). Writers (`store`, the invalidations, `flush`) are serialised by one
//! mutex, each holding it for one small redb transaction. Everything does disk I/O.
//! `fsync` is waited for by [`Cache::open`], [`Cache::flush`], [`Cache::close`] (and drop),
//! and by a [`Cache::store`] that evicts (once per segment's worth of stored data; it
//! removes the segment's entries in batches of `EVICT_BATCH`, then commits durably). Other
//! writers wait at most for one such batch or durable commit, never for a whole eviction
//! or for syncing all the data written since the last flush: the bulk of that sync happens
//! with the lock released; what remains is redb's durable commit, which writes the index
//! pages dirtied since the last one. Measured (release build, `tests/bench.rs`): in a
//! 1 GiB cache an eviction (32 MiB segment, 8 700 records) takes ~55 ms inside the `store`
//! that triggers it and a concurrent `invalidate` waited at most ~12 ms; in a 10 GiB cache
//! (256 MiB segments, 65 000 records) ~460 ms and ~90 ms. Call the `fsync`ing methods and
//! `store` from `spawn_blocking`; `invalidate*`/`drop_current` are usually well under a
//! millisecond but may wait that long behind an eviction or a flush.

mod index;
mod recent;
mod redb_file;
mod segment;
#[cfg(test)]
mod tests;

use fsio::{FileIo, Fs, Mode};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, MutexGuard, RwLock};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableError,
    WriteTransaction,
};
use tracing::{debug, error, info, warn};
use zodb::{Oid, Tid};

use index::{CurrentEntry, EntryTables, Epochs, Standing};
use recent::{Accessed, RecentInvalidations};
use segment::{Loc, RecordError, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};

/// Default number of transactions kept in the invalidation log.
pub const DEFAULT_INVALIDATION_LOG_SIZE: usize = 100_000;

const INDEX_FILE: &str = "index.redb";
const BAD_INDEX_FILE: &str = "index.redb.bad";
const SEGMENTS_DIR: &str = "segments";
const MIN_SEGMENT: u64 = 1 << 20;
const MAX_SEGMENT: u64 = 256 << 20;
/// Bytes of index memory per oid remembered by the "answer overtaken by an invalidation"
/// check: 16 MB of index memory (the default for caches up to 1 GB) remember 256 Ki oids.
const INDEX_MEMORY_PER_RECENT_OID: u64 = 64;
/// The least index memory honoured: below it the page cache thrashes on every lookup.
const MIN_INDEX_MEMORY: u64 = 256 << 10;
/// Location rows handled per batch while evicting a segment.
const EVICT_BATCH: usize = 1024;

/// Where the cache lives and how big it may grow.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Directory of the cache; created if missing. One process at a time.
    pub dir: PathBuf,
    /// Bound on the bytes of the segment files (the object data).
    pub max_bytes: u64,
    /// Transactions kept in the invalidation log; 0 disables the log.
    pub invalidation_log_size: usize,
    /// Memory for the index: the page cache of `index.redb` and, 1/64 of it counted in
    /// oids, the window of recent invalidations. `None`: 1/64 of `max_bytes`, between 16
    /// and 256 MB. Together with the second-chance marks (`max_bytes / 2048` records)
    /// these are what the cache holds in memory; they fill as the cache is used and
    /// then stay at their bound.
    pub index_memory: Option<u64>,
}

impl CacheConfig {
    /// A config with the default invalidation log size.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> CacheConfig {
        CacheConfig {
            dir: dir.into(),
            max_bytes,
            invalidation_log_size: DEFAULT_INVALIDATION_LOG_SIZE,
            index_memory: None,
        }
    }

    /// The index memory in effect (see [`CacheConfig::index_memory`]).
    pub fn effective_index_memory(&self) -> u64 {
        self.index_memory
            .unwrap_or((self.max_bytes / 64).clamp(16 << 20, 256 << 20))
            .max(MIN_INDEX_MEMORY)
    }
}

/// A revision as the cache returns it: the one loaded-revision type of the project.
/// `end == None` means current as of the cache's `last_tid`; `Some(e)`: valid for
/// `[start, e)` (`e` is the next revision's tid, or an earlier bound when that is all the
/// cache knows).
pub type CachedRevision = zodb::Loaded;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache I/O: {0}")]
    Io(#[from] io::Error),
    #[error("cache index: {0}")]
    Index(#[from] redb::Error),
    #[error("cache is corrupt: {0}")]
    Corrupt(String),
    #[error("the cache failed to apply an invalidation and serves nothing until restarted")]
    Poisoned,
}

macro_rules! index_error_from {
    ($($t:ty),*) => {$(
        impl From<$t> for CacheError {
            fn from(e: $t) -> CacheError {
                CacheError::Index(redb::Error::from(e))
            }
        }
    )*};
}
index_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

#[derive(Debug, Clone, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Revisions dropped by segment eviction (those copied forward are not counted).
    pub evictions: u64,
    /// Bytes of the segment files.
    pub bytes: u64,
    /// Cached revisions, current and non-current.
    pub entries: u64,
    /// Revisions stored (or whose validity was extended) by [`Cache::store`].
    pub stores: u64,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    bytes: AtomicU64,
    entries: AtomicU64,
    stores: AtomicU64,
}

/// The segment being appended to.
struct Active {
    seg: u64,
    file: Arc<dyn FileIo>,
    len: u64,
}

/// Writer-side state, under one mutex.
struct Writer {
    active: Option<Active>,
    next_seg: u64,
    /// Size of every segment file, oldest first.
    sizes: BTreeMap<u64, u64>,
    total_bytes: u64,
    /// Segments appended to since the last durable commit.
    unsynced: BTreeSet<u64>,
    /// A segment was created since the last durable commit.
    dir_unsynced: bool,
    /// Segments being evicted (by a writer that yielded the lock between batches).
    evicting: BTreeSet<u64>,
    last_tid: Tid,
    recent: RecentInvalidations,
}

/// How an invalidation describes what changed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Changes {
    /// One transaction: the oids changed exactly at the tid.
    Transaction,
    /// The oids changed somewhere between the cache's last tid and the tid.
    Summary,
}

/// The persistent cache. See the module documentation.
pub struct Cache {
    /// The file system of the cache directory (a simulated disk in the crash tests).
    fs: Arc<dyn Fs>,
    segments_dir: PathBuf,
    max_bytes: u64,
    segment_size: u64,
    max_record: u64,
    log_size: usize,
    db: Database,
    writer: Mutex<Writer>,
    files: RwLock<HashMap<u64, Arc<dyn FileIo>>>,
    epochs: RwLock<Epochs>,
    /// Non-current entries starting at or before this tid are not served: `packed` is
    /// deleting them (zero when no purge is pending).
    purge_floor: AtomicU64,
    accessed: Mutex<Accessed>,
    last_tid: AtomicU64,
    poisoned: AtomicBool,
    closed: bool,
    counters: Counters,
}

/// Why an open attempt failed.
enum OpenError {
    /// The index cannot be used (corrupt, foreign, another format): start afresh.
    Unusable(String),
    /// Anything else (permissions, already open elsewhere, I/O): report it.
    Fatal(CacheError),
}

impl<E: Into<redb::Error>> From<E> for OpenError {
    fn from(e: E) -> OpenError {
        let e: redb::Error = e.into();
        match e {
            redb::Error::Io(io)
                if !matches!(
                    io.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ) =>
            {
                OpenError::Fatal(CacheError::Io(io))
            }
            redb::Error::Io(_) => OpenError::Unusable(e.to_string()),
            redb::Error::DatabaseAlreadyOpen
            | redb::Error::LockProtocolMismatch
            | redb::Error::TransactionInProgress
            | redb::Error::PreviousIo
            | redb::Error::DatabaseClosed
            | redb::Error::LockPoisoned(_)
            | redb::Error::WouldBlock => OpenError::Fatal(CacheError::Index(e)),
            _ => OpenError::Unusable(e.to_string()),
        }
    }
}

/// What the index says at open.
struct Persisted {
    last_tid: Tid,
    epochs: Epochs,
    /// A purge of non-current entries that `packed` did not finish.
    purge_floor: Tid,
    clean: Option<(u64, u64)>,
    referenced: Vec<u64>,
    entries: u64,
}

fn segment_size(max_bytes: u64) -> u64 {
    (max_bytes / 32)
        .clamp(MIN_SEGMENT, MAX_SEGMENT)
        .min(max_bytes / 4)
        .max(4096)
}

/// The tid just after `t`: the end bound of a revision known current at `t`.
fn after(t: Tid) -> Tid {
    Tid(t.0.saturating_add(1))
}

fn io_err(e: io::Error) -> OpenError {
    OpenError::Fatal(CacheError::Io(e))
}

impl Cache {
    /// Opens (or creates) the cache in `config.dir`. An index that cannot be used is set
    /// aside as `index.redb.bad` with a warning, and the cache starts empty. Blocks on
    /// `fsync`; bounded work (no scan of data or index).
    pub fn open(config: CacheConfig) -> Result<Cache, CacheError> {
        Self::open_on(fsio::real(), config)
    }

    /// [`Cache::open`] with the cache directory on the file system `fs` (a simulated disk
    /// in the crash tests).
    pub fn open_on(fs: Arc<dyn Fs>, config: CacheConfig) -> Result<Cache, CacheError> {
        let started = std::time::Instant::now();
        let cache = match Self::try_open(&fs, &config) {
            Ok(cache) => cache,
            Err(OpenError::Fatal(e)) => return Err(e),
            Err(OpenError::Unusable(why)) => {
                warn!(dir = %config.dir.display(), %why,
                      "the proxy cache index is unusable; setting it aside and starting empty");
                let index = config.dir.join(INDEX_FILE);
                match fs.rename(&index, &config.dir.join(BAD_INDEX_FILE)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e.into()),
                    _ => {}
                }
                match Self::try_open(&fs, &config) {
                    Ok(cache) => cache,
                    Err(OpenError::Fatal(e)) => return Err(e),
                    Err(OpenError::Unusable(why)) => return Err(CacheError::Corrupt(why)),
                }
            }
        };
        info!(dir = %config.dir.display(), last_tid = %cache.last_tid(),
              entries = cache.counters.entries.load(Ordering::Relaxed),
              bytes = cache.counters.bytes.load(Ordering::Relaxed),
              max_bytes = config.max_bytes, index_memory = config.effective_index_memory(),
              elapsed_ms = started.elapsed().as_millis() as u64, "proxy cache opened");
        Ok(cache)
    }

    fn try_open(fs: &Arc<dyn Fs>, config: &CacheConfig) -> Result<Cache, OpenError> {
        // redb may panic rather than fail on some damaged files (debug builds do so on
        // purpose): a panic here means an unusable index, not a crashed proxy.
        match catch_unwind(AssertUnwindSafe(|| Self::try_open_inner(fs, config))) {
            Ok(result) => result,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("panic");
                Err(OpenError::Unusable(format!(
                    "opening the index panicked: {what}"
                )))
            }
        }
    }

    fn try_open_inner(fs: &Arc<dyn Fs>, config: &CacheConfig) -> Result<Cache, OpenError> {
        let segments_dir = config.dir.join(SEGMENTS_DIR);
        fsio::create_dir_all(&**fs, &segments_dir).map_err(io_err)?;
        let index_path = config.dir.join(INDEX_FILE);
        let created = !fsio::exists(&**fs, &index_path);
        let index_memory = config.effective_index_memory();
        let db = redb_file::open(fs, &index_path, index_memory)?;
        if created {
            fs.sync_dir(&config.dir).map_err(io_err)?;
        }
        let persisted = Self::read_persisted(&db)?;
        let Persisted {
            last_tid,
            epochs,
            purge_floor,
            clean,
            referenced,
            entries,
        } = persisted;

        // One setup transaction: the tables exist, the format is stamped, the clean-close
        // marker is gone (from now on the segment it names may grow past the length it
        // records), the log fits its configured size.
        let mut txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_FORMAT, index::FORMAT)?;
            meta.insert(index::META_LAST_TID, last_tid.0)?;
            meta.insert(index::META_GENERATION, u64::from(epochs.current))?;
            meta.remove(index::META_CLEAN_SEG)?;
            meta.remove(index::META_CLEAN_LEN)?;
            drop(meta);
            EntryTables::open(&txn)?;
            txn.open_table(index::EPOCHS)?;
            txn.open_table(index::PACK_FLOORS)?;
            let mut log = txn.open_table(index::INVALIDATIONS)?;
            while log.len()? > config.invalidation_log_size as u64 {
                log.pop_first()?;
            }
        }
        txn.set_quick_repair(true);
        txn.commit()?;

        // Segment files: keep those the index mentions, delete the rest (written after the
        // last durable commit, or already evicted). Purge entries whose segment is gone.
        let mut on_disk = BTreeMap::new();
        for dirent in fs.read_dir(&segments_dir).map_err(io_err)? {
            if let Some(seg) = dirent.name.to_str().and_then(segment::parse_segment_name) {
                on_disk.insert(seg, segments_dir.join(&dirent.name));
            }
        }
        let next_seg = on_disk
            .keys()
            .chain(referenced.iter())
            .max()
            .map_or(1, |&m| m.saturating_add(1));
        let referenced: BTreeSet<u64> = referenced.into_iter().collect();
        for (seg, path) in &on_disk {
            if !referenced.contains(seg) {
                debug!(seg, "deleting an unreferenced cache segment");
                fs.remove_file(path).map_err(io_err)?;
            }
        }
        let mut files = HashMap::new();
        let mut sizes = BTreeMap::new();
        let mut active = None;
        let mut missing = Vec::new();
        for &seg in &referenced {
            let Some(path) = on_disk.get(&seg) else {
                missing.push(seg);
                continue;
            };
            let reuse = clean.filter(|&(s, _)| s == seg).map(|(_, len)| len);
            let mode = if reuse.is_some() {
                Mode::Write
            } else {
                Mode::Read
            };
            let file = fs.open(path, mode).map_err(io_err)?;
            if !segment::check_segment_header(&*file, seg).map_err(io_err)? {
                warn!(seg, "cache segment has a bad header; dropping its entries");
                missing.push(seg);
                continue;
            }
            let mut size = file.size().map_err(io_err)?;
            if let Some(len) = reuse {
                // After a clean close the last segment continues; cut anything past the
                // length the close recorded (there should be nothing).
                if size >= len && len >= SEGMENT_HEADER_LEN && len <= u64::from(u32::MAX) {
                    if size > len {
                        file.set_len(len).map_err(io_err)?;
                        size = len;
                    }
                    active = Some(Active {
                        seg,
                        file: file.clone(),
                        len,
                    });
                }
            }
            files.insert(seg, file);
            sizes.insert(seg, size);
        }
        let total_bytes = sizes.values().sum();
        let max_bytes = config.max_bytes;
        let segment_size = segment_size(max_bytes);
        let cache = Cache {
            fs: fs.clone(),
            segments_dir,
            max_bytes,
            segment_size,
            max_record: (segment_size - SEGMENT_HEADER_LEN)
                .min(max_bytes / 4)
                .min(u64::from(u32::MAX)),
            log_size: config.invalidation_log_size,
            db,
            writer: Mutex::new(Writer {
                active,
                next_seg,
                sizes,
                total_bytes,
                unsynced: BTreeSet::new(),
                dir_unsynced: false,
                evicting: BTreeSet::new(),
                last_tid,
                // A new cache knows nothing of upstream yet: no answer can be checked
                // until the first transaction (or drop_current) starts the window.
                recent: RecentInvalidations::new(
                    if last_tid == Tid::ZERO {
                        Tid::MAX
                    } else {
                        last_tid
                    },
                    usize::try_from(index_memory / INDEX_MEMORY_PER_RECENT_OID)
                        .unwrap_or(usize::MAX),
                ),
            }),
            files: RwLock::new(files),
            epochs: RwLock::new(epochs),
            purge_floor: AtomicU64::new(purge_floor.0),
            accessed: Mutex::new(Accessed::new(
                usize::try_from(max_bytes / 2048)
                    .unwrap_or(usize::MAX)
                    .clamp(4096, 2_000_000),
            )),
            last_tid: AtomicU64::new(last_tid.0),
            poisoned: AtomicBool::new(false),
            closed: false,
            counters: Counters::default(),
        };
        cache.counters.bytes.store(total_bytes, Ordering::Relaxed);
        cache.counters.entries.store(entries, Ordering::Relaxed);
        {
            let mut w = cache.writer.lock();
            for seg in missing {
                warn!(seg, "cache segment is missing; dropping its entries");
                cache
                    .evict_segment(&mut w, seg, false)
                    .map_err(OpenError::Fatal)?;
            }
            // The configured size may have shrunk.
            cache.make_room(&mut w, 0).map_err(OpenError::Fatal)?;
            if purge_floor > Tid::ZERO {
                info!(floor = %purge_floor, "finishing the purge of entries a pack removed");
                cache
                    .purge_noncurrent(&mut w, purge_floor)
                    .map_err(OpenError::Fatal)?;
            }
        }
        Ok(cache)
    }

    fn read_persisted(db: &Database) -> Result<Persisted, OpenError> {
        let txn = db.begin_read()?;
        let meta = match txn.open_table(index::META) {
            Ok(meta) => meta,
            // A new database (or one whose first setup never committed).
            Err(TableError::TableDoesNotExist(_)) => {
                return Ok(Persisted {
                    last_tid: Tid::ZERO,
                    epochs: Epochs::default(),
                    purge_floor: Tid::ZERO,
                    clean: None,
                    referenced: Vec::new(),
                    entries: 0,
                })
            }
            Err(e) => return Err(e.into()),
        };
        let get =
            |key: &str| -> Result<Option<u64>, OpenError> { Ok(meta.get(key)?.map(|g| g.value())) };
        match get(index::META_FORMAT)? {
            Some(index::FORMAT) => {}
            other => return Err(OpenError::Unusable(format!("index format {other:?}"))),
        }
        let last_tid = Tid(get(index::META_LAST_TID)?.unwrap_or(0));
        let generation = u32::try_from(get(index::META_GENERATION)?.unwrap_or(0))
            .map_err(|_| OpenError::Unusable("generation out of range".into()))?;
        let clean = get(index::META_CLEAN_SEG)?.zip(get(index::META_CLEAN_LEN)?);
        let mut epochs = Epochs {
            current: generation,
            ends: HashMap::new(),
            floors: HashMap::new(),
        };
        for item in txn.open_table(index::EPOCHS)?.iter()? {
            let (k, v) = item?;
            epochs.ends.insert(k.value(), Tid(v.value()));
        }
        match txn.open_table(index::PACK_FLOORS) {
            Ok(floors) => {
                for item in floors.iter()? {
                    let (k, v) = item?;
                    epochs.floors.insert(k.value(), Tid(v.value()));
                }
            }
            // A cache written before packs were forwarded.
            Err(TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let purge_floor = Tid(get(index::META_PURGE_FLOOR)?.unwrap_or(0));
        let current = txn.open_table(index::CURRENT)?;
        let noncurrent = txn.open_table(index::NONCURRENT)?;
        let locations = txn.open_table(index::LOCATIONS)?;
        Ok(Persisted {
            last_tid,
            epochs,
            purge_floor,
            clean,
            referenced: index::referenced_segments(&locations)?,
            entries: current.len()? + noncurrent.len()?,
        })
    }

    /// The upstream tid the cache is valid as of; `Tid::ZERO` for a new cache, which knows
    /// nothing: its first call should be `drop_current` or `invalidate_many` with
    /// upstream's last tid, and until then no answer is cached as current.
    pub fn last_tid(&self) -> Tid {
        Tid(self.last_tid.load(Ordering::Acquire))
    }

    fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    fn poison(&self, what: &str, e: &CacheError) {
        error!(error = %e, "proxy cache failed to {what}; it serves nothing until restarted");
        self.poisoned.store(true, Ordering::Release);
    }

    /// The revision of `oid` current just before `before` if the cache knows it: `Some(rev)`
    /// where `rev.start < before` and (`rev.end` is `None`, current as of `last_tid`, or
    /// `before <= rev.end`). `None` = miss. Reads only; never waits for writers.
    pub fn load_before(&self, oid: Oid, before: Tid) -> Option<CachedRevision> {
        let found = if self.is_poisoned() {
            None
        } else {
            self.lookup_before(oid, before, false).unwrap_or_else(|e| {
                warn!(error = %e, %oid, "cache lookup failed");
                None
            })
        };
        let rev = found.and_then(|(start, end, loc)| {
            let data = self.read_entry(oid, start, loc)?;
            Some(CachedRevision { data, start, end })
        });
        self.count_lookup(rev.is_some());
        rev
    }

    /// Whether the cache holds a current revision of `oid` (index only, no data read,
    /// not counted as a hit or miss): prefetching skips those.
    pub fn has_current(&self, oid: Oid) -> bool {
        !self.is_poisoned()
            && matches!(
                self.lookup_before(oid, Tid::MAX, false),
                Ok(Some((_, None, _)))
            )
    }

    /// The revision `load_before` would return were it not suspect since a pack (see
    /// [`Cache::packed`]): current, unless upstream removed it. Read only on a miss; the
    /// caller asks upstream and then calls [`Cache::confirm`] or [`Cache::forget`].
    /// Not counted as a hit or miss.
    pub fn load_suspect(&self, oid: Oid, before: Tid) -> Option<CachedRevision> {
        if self.is_poisoned() {
            return None;
        }
        let (start, end, loc) = self.lookup_before(oid, before, true).ok()??;
        let data = self.read_entry(oid, start, loc)?;
        Some(CachedRevision { data, start, end })
    }

    /// With `suspect`, only a suspect current entry is returned (as current); without,
    /// suspect entries are not returned.
    fn lookup_before(
        &self,
        oid: Oid,
        before: Tid,
        suspect: bool,
    ) -> Result<Option<(Tid, Option<Tid>, Loc)>, CacheError> {
        let txn = self.db.begin_read()?;
        if let Some(c) = index::get_current(&txn.open_table(index::CURRENT)?, oid)? {
            // Read after the snapshot was taken (see `drop_current`).
            let standing = self.epochs.read().standing(c.generation, c.start);
            let end = match (standing, suspect) {
                (Standing::Suspect, true) => None,
                (_, true) => return Ok(None),
                (Standing::Current, false) => None,
                (Standing::Suspect, false) => Some(c.start),
                (Standing::Ended(e), false) => Some(e),
            };
            if c.start < before && end.is_none_or(|e| before <= e) {
                return Ok(Some((c.start, end, c.loc)));
            }
        }
        if suspect {
            return Ok(None);
        }
        let purge_floor = Tid(self.purge_floor.load(Ordering::Acquire));
        let noncurrent = txn.open_table(index::NONCURRENT)?;
        Ok(index::noncurrent_before(&noncurrent, oid, before)?
            .filter(|(start, n)| before <= n.end && *start > purge_floor)
            .map(|(start, n)| (start, Some(n.end), n.loc)))
    }

    /// Exactly revision `serial` of `oid`, if cached (current or not).
    pub fn load_serial(&self, oid: Oid, serial: Tid) -> Option<Bytes> {
        let found = if self.is_poisoned() {
            None
        } else {
            self.lookup_serial(oid, serial).unwrap_or_else(|e| {
                warn!(error = %e, %oid, "cache lookup failed");
                None
            })
        };
        let data = found.and_then(|loc| self.read_entry(oid, serial, loc));
        self.count_lookup(data.is_some());
        data
    }

    fn lookup_serial(&self, oid: Oid, serial: Tid) -> Result<Option<Loc>, CacheError> {
        let txn = self.db.begin_read()?;
        if let Some(c) = index::get_current(&txn.open_table(index::CURRENT)?, oid)? {
            if c.start == serial {
                // A revision's data never changes; whether upstream still has it does
                // (a suspect or packed-away entry is not served).
                let usable = match self.epochs.read().standing(c.generation, c.start) {
                    Standing::Current => true,
                    Standing::Suspect => false,
                    Standing::Ended(e) => e > c.start,
                };
                return Ok(usable.then_some(c.loc));
            }
        }
        if serial <= Tid(self.purge_floor.load(Ordering::Acquire)) {
            return Ok(None);
        }
        let noncurrent = txn.open_table(index::NONCURRENT)?;
        Ok(index::get_noncurrent(&noncurrent, oid, serial)?.map(|n| n.loc))
    }

    fn count_lookup(&self, hit: bool) {
        let counter = if hit {
            &self.counters.hits
        } else {
            &self.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads and checks a record; a bad one is a miss and its entry is dropped.
    fn read_entry(&self, oid: Oid, start: Tid, loc: Loc) -> Option<Bytes> {
        let file = self.files.read().get(&loc.seg).cloned();
        let result = match file {
            Some(file) => segment::read_record(&*file, loc, oid, start),
            None => Err(RecordError::MissingSegment(loc.seg)),
        };
        match result {
            Ok(data) => {
                self.accessed.lock().mark(loc);
                Some(data)
            }
            // Evicted between the index lookup and the read.
            Err(RecordError::MissingSegment(_)) => None,
            Err(e) => {
                warn!(error = %e, %oid, %start, seg = loc.seg, off = loc.off,
                      "unreadable cache record; dropping its entry");
                self.drop_entry(oid, start, loc);
                None
            }
        }
    }

    fn drop_entry(&self, oid: Oid, start: Tid, loc: Loc) {
        let _w = self.writer.lock();
        let result = self.write_txn(|txn| {
            let mut t = EntryTables::open(txn)?;
            t.remove_at(oid, start, loc)?;
            Ok(t.len()?)
        });
        match result {
            Ok(entries) => self.counters.entries.store(entries, Ordering::Relaxed),
            Err(e) => warn!(error = %e, "dropping a bad cache entry failed"),
        }
    }

    /// Remembers a revision fetched from upstream. `end == None` means upstream said it is
    /// current, and `seen` is the upstream tid that answer reflects (every invalidation up
    /// to `seen` had been received when the answer arrived). It is stored as current only
    /// if no invalidation of `oid` after `seen` has been applied (and `seen` is recent
    /// enough for the cache to know); if a current entry with a greater start is cached it
    /// is kept instead. With `end == Some(e)` the revision is stored as non-current
    /// `[start, e)`. Too big records are not cached. Waits for `fsync` when it has to evict.
    pub fn store(&self, oid: Oid, start: Tid, end: Option<Tid>, data: Bytes, seen: Tid) {
        if self.is_poisoned() || end.is_some_and(|e| e <= start) {
            return;
        }
        if RECORD_HEADER_LEN + data.len() as u64 > self.max_record {
            debug!(%oid, len = data.len(), "record too big for the proxy cache");
            return;
        }
        let mut w = self.writer.lock();
        let overtaken = |w: &Writer| end.is_none() && !w.recent.may_store_current(oid, seen);
        if overtaken(&w) {
            debug!(%oid, %start, %seen, "not caching an answer overtaken by an invalidation");
            return;
        }
        // Room first, outside the store's own transaction. Eviction lets other writers in
        // between its batches, so an invalidation may have arrived meanwhile: check again.
        // (It may also evict a little early when the store turns out to be a duplicate.)
        if let Err(e) = self.make_room(&mut w, RECORD_HEADER_LEN + data.len() as u64) {
            warn!(error = %e, "evicting from the proxy cache failed");
            return;
        }
        if overtaken(&w) {
            return;
        }
        match self.store_locked(&mut w, oid, start, end, &data) {
            Ok(true) => {
                self.counters.stores.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, %oid, "storing in the proxy cache failed"),
        }
    }

    fn store_locked(
        &self,
        w: &mut Writer,
        oid: Oid,
        start: Tid,
        end: Option<Tid>,
        data: &[u8],
    ) -> Result<bool, CacheError> {
        let epochs = self.epochs.read().clone();
        let last = w.last_tid;
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let (stored, entries) = {
            let mut t = EntryTables::open(&txn)?;
            let stored = self.store_in(w, &mut t, &epochs, last, oid, start, end, data)?;
            (stored, t.len()?)
        };
        if stored {
            txn.commit()?;
            self.counters.entries.store(entries, Ordering::Relaxed);
        } else {
            txn.abort()?;
        }
        Ok(stored)
    }

    #[allow(clippy::too_many_arguments)]
    fn store_in(
        &self,
        w: &mut Writer,
        t: &mut EntryTables<'_>,
        epochs: &Epochs,
        last: Tid,
        oid: Oid,
        start: Tid,
        end: Option<Tid>,
        data: &[u8],
    ) -> Result<bool, CacheError> {
        let current = t.current(oid)?;
        match end {
            None => {
                if let Some(c) = current {
                    if c.generation == epochs.current && c.start >= start {
                        return Ok(false); // this revision or a newer one is cached
                    }
                    // `c` is older. If it is of the current generation and started at or
                    // before `last`, it was current at `last`: keep it for [start, last+1).
                    let end = epochs.end_of(c.generation, c.start).or(Some(after(last)));
                    t.retire_current(oid, c, end)?;
                }
                let entry = |loc| CurrentEntry {
                    start,
                    generation: epochs.current,
                    loc,
                };
                if let Some(n) = t.noncurrent(oid, start)? {
                    // Already cached as non-current (with a conservative end): promote it.
                    t.noncurrent.remove((oid.0, start.0))?;
                    t.put_current(oid, entry(n.loc))?;
                } else {
                    let loc = self.append(w, oid, start, data)?;
                    t.put_current(oid, entry(loc))?;
                }
                Ok(true)
            }
            Some(end) => {
                if let Some(c) = current.filter(|c| c.start == start) {
                    if c.generation == epochs.current {
                        return Ok(false); // the invalidation at `end` will end it
                    }
                    t.retire_current(oid, c, Some(end))?;
                    return Ok(true);
                }
                if let Some(n) = t.noncurrent(oid, start)? {
                    if n.end >= end {
                        return Ok(false);
                    }
                    t.put_noncurrent(oid, start, end, n.loc)?;
                } else {
                    let loc = self.append(w, oid, start, data)?;
                    t.put_noncurrent(oid, start, end, loc)?;
                }
                Ok(true)
            }
        }
    }

    /// Applies an upstream transaction, in tid order (`tid > last_tid`, else ignored with a
    /// warning): each oid's current entry with `start < tid` becomes non-current
    /// `[start, tid)`; entries with `start >= tid` stay. Appends `(tid, oids)` to the
    /// invalidation log and sets `last_tid = tid`, all in one transaction (not durable
    /// until the next flush). No `fsync`.
    pub fn invalidate(&self, tid: Tid, oids: &[Oid]) {
        self.apply_changes(tid, oids, Changes::Transaction);
    }

    /// Catch-up when only the set of oids changed in `(last_tid, tid]` is known (e.g. from
    /// `getInvalidations`): current entries of these oids that may be stale are ended at
    /// `last_tid + 1` (the last point they are known valid) or dropped; those starting at or
    /// after `tid` stay. Logs `(tid, oids)` and sets `last_tid = tid`. No `fsync`.
    ///
    /// (Ending them at `tid`, as the first sketch of this API said, would be wrong: the
    /// revision may have been replaced anywhere in `(last_tid, tid]`.)
    pub fn invalidate_many(&self, tid: Tid, oids: &[Oid]) {
        self.apply_changes(tid, oids, Changes::Summary);
    }

    fn apply_changes(&self, tid: Tid, oids: &[Oid], changes: Changes) {
        if self.is_poisoned() {
            return;
        }
        let mut w = self.writer.lock();
        let last = w.last_tid;
        if tid <= last {
            warn!(%tid, last_tid = %last, "ignoring an invalidation not after the cache's last tid");
            return;
        }
        let epochs = self.epochs.read().clone();
        let result = self.write_txn(|txn| {
            let mut t = EntryTables::open(txn)?;
            for &oid in oids {
                let Some(c) = t.current(oid)? else { continue };
                let end = match epochs.standing(c.generation, c.start) {
                    Standing::Current if c.start >= tid => continue, // reflects the change
                    Standing::Current => match changes {
                        Changes::Transaction => Some(tid),
                        // Changed somewhere in (last, tid]. An entry with start <= last
                        // was current at `last`: valid up to last + 1. One with
                        // last < start < tid may be stale: the empty interval drops it.
                        Changes::Summary => Some(after(last)),
                    },
                    // Perhaps packed away: not worth keeping as history.
                    Standing::Suspect => None,
                    Standing::Ended(end) => Some(end),
                };
                t.retire_current(oid, c, end)?;
            }
            let entries = t.len()?;
            drop(t);
            self.log_append(txn, tid, oids)?;
            txn.open_table(index::META)?
                .insert(index::META_LAST_TID, tid.0)?;
            Ok(entries)
        });
        match result {
            Ok(entries) => {
                self.counters.entries.store(entries, Ordering::Relaxed);
                if last == Tid::ZERO {
                    w.recent.reset(tid); // the first position: the window starts here
                }
                w.recent.record(tid, oids);
                w.last_tid = tid;
                self.last_tid.store(tid.0, Ordering::Release);
            }
            Err(e) => self.poison("apply an invalidation", &e),
        }
    }

    fn log_append(&self, txn: &WriteTransaction, tid: Tid, oids: &[Oid]) -> Result<(), CacheError> {
        if self.log_size == 0 {
            return Ok(());
        }
        let mut log = txn.open_table(index::INVALIDATIONS)?;
        log.insert(tid.0, index::pack_oids(oids).as_slice())?;
        while log.len()? > self.log_size as u64 {
            log.pop_first()?;
        }
        Ok(())
    }

    /// Forgets which entries are current (upstream could not tell what changed) and sets
    /// `last_tid = tid`. O(1): the current entries are not touched but retired as a
    /// generation; they stay usable as non-current `[start, old last_tid + 1)` for older
    /// snapshots and for `load_serial`. The invalidation log restarts at `tid` (nothing
    /// before it can be answered any more). No `fsync`.
    pub fn drop_current(&self, tid: Tid) {
        if self.is_poisoned() {
            return;
        }
        let mut w = self.writer.lock();
        let last = w.last_tid;
        if tid < last {
            warn!(%tid, last_tid = %last, "ignoring drop_current before the cache's last tid");
            return;
        }
        let old = self.epochs.read().current;
        let Some(new) = old.checked_add(1) else {
            self.poison(
                "drop current entries",
                &CacheError::Corrupt("generations exhausted".into()),
            );
            return;
        };
        let end = after(last);
        // Generations made suspect by a pack are current too, until now.
        let suspect: Vec<u32> = {
            let epochs = self.epochs.read();
            epochs
                .floors
                .keys()
                .copied()
                .filter(|g| !epochs.ends.contains_key(g))
                .collect()
        };
        let result = self.write_txn(|txn| {
            let mut ends = txn.open_table(index::EPOCHS)?;
            ends.insert(old, end.0)?;
            for &g in &suspect {
                ends.insert(g, end.0)?;
            }
            drop(ends);
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_GENERATION, u64::from(new))?;
            meta.insert(index::META_LAST_TID, tid.0)?;
            drop(meta);
            txn.delete_table(index::INVALIDATIONS)?;
            // The oldest entry bounds what the log can answer: nothing before `tid`.
            self.log_append(txn, tid, &[])?;
            Ok(())
        });
        match result {
            Ok(()) => {
                // Readers look at the epochs after taking their snapshot, and new-generation
                // entries are only written after this, so no reader ever takes an entry of
                // the new generation for one of the old or the other way round.
                let mut epochs = self.epochs.write();
                epochs.ends.insert(old, end);
                for g in suspect {
                    epochs.ends.insert(g, end);
                }
                epochs.current = new;
                drop(epochs);
                w.recent.reset(tid);
                w.last_tid = tid;
                self.last_tid.store(tid.0, Ordering::Release);
            }
            Err(e) => self.poison("drop current entries", &e),
        }
    }

    /// Upstream was packed: any revision that started at or before `floor` may be gone
    /// (see [`index::Epochs`]). Non-current entries starting by then are deleted (they
    /// are unreadable at once, before the deletion finishes, and a purge cut short by a
    /// crash is finished at the next open); current entries become suspect: loads miss
    /// them, [`Cache::load_suspect`] offers them for verification. O(non-current entries);
    /// current entries are not touched. No `fsync`.
    pub fn packed(&self, floor: Tid) {
        if self.is_poisoned() || floor == Tid::ZERO {
            return;
        }
        let mut w = self.writer.lock();
        let (old, floors) = {
            let epochs = self.epochs.read();
            let mut floors = epochs.floors.clone();
            for g in epochs
                .ends
                .keys()
                .copied()
                .chain(std::iter::once(epochs.current))
            {
                let f = floors.entry(g).or_insert(floor);
                *f = (*f).max(floor);
            }
            for f in floors.values_mut() {
                *f = (*f).max(floor);
            }
            (epochs.current, floors)
        };
        let Some(new) = old.checked_add(1) else {
            self.poison(
                "mark entries a pack may have removed",
                &CacheError::Corrupt("generations exhausted".into()),
            );
            return;
        };
        let purge = floor.max(Tid(self.purge_floor.load(Ordering::Acquire)));
        let result = self.write_txn(|txn| {
            let mut t = txn.open_table(index::PACK_FLOORS)?;
            for (&g, &f) in &floors {
                t.insert(g, f.0)?;
            }
            drop(t);
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_GENERATION, u64::from(new))?;
            meta.insert(index::META_PURGE_FLOOR, purge.0)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                // As in `drop_current`: new-generation entries are written only after this.
                self.purge_floor.store(purge.0, Ordering::Release);
                let mut epochs = self.epochs.write();
                epochs.floors = floors;
                epochs.current = new;
            }
            Err(e) => return self.poison("mark entries a pack may have removed", &e),
        }
        if let Err(e) = self.purge_noncurrent(&mut w, purge) {
            self.poison("drop entries a pack removed", &e);
        }
    }

    /// Deletes the non-current entries starting at or before `floor`, a batch per write
    /// transaction, then clears the pending purge.
    fn purge_noncurrent(&self, _w: &mut Writer, floor: Tid) -> Result<(), CacheError> {
        let mut from = (0u64, 0u64);
        loop {
            let (batch, entries) = self.write_txn(|txn| {
                let mut t = EntryTables::open(txn)?;
                let rows: Vec<(u64, u64, Loc)> = t
                    .noncurrent
                    .range(from..)?
                    .filter_map(Result::ok)
                    .map(|(k, v)| {
                        let (oid, start) = k.value();
                        let (_, seg, off, len) = v.value();
                        (oid, start, Loc { seg, off, len })
                    })
                    .filter(|(_, start, _)| *start <= floor.0)
                    .take(EVICT_BATCH)
                    .collect();
                for (oid, start, loc) in &rows {
                    t.remove_at(Oid(*oid), Tid(*start), *loc)?;
                }
                Ok((rows, t.len()?))
            })?;
            self.counters.entries.store(entries, Ordering::Relaxed);
            match batch.last() {
                Some(&(oid, start, _)) if batch.len() == EVICT_BATCH => {
                    from = (oid, start.saturating_add(1));
                }
                _ => break,
            }
        }
        self.write_txn(|txn| {
            txn.open_table(index::META)?
                .insert(index::META_PURGE_FLOOR, 0)?;
            Ok(())
        })?;
        self.purge_floor.store(0, Ordering::Release);
        Ok(())
    }

    /// The greatest pack floor the cache has been told of ([`Cache::packed`]).
    pub fn pack_floor(&self) -> Tid {
        self.epochs.read().max_floor()
    }

    /// Upstream confirmed that the suspect current revision `(oid, start)` still exists
    /// and is current: it is served again.
    pub fn confirm(&self, oid: Oid, start: Tid) {
        self.settle_suspect(oid, start, true);
    }

    /// Upstream no longer has the suspect revision `(oid, start)` as current: dropped.
    pub fn forget(&self, oid: Oid, start: Tid) {
        self.settle_suspect(oid, start, false);
    }

    fn settle_suspect(&self, oid: Oid, start: Tid, keep: bool) {
        if self.is_poisoned() {
            return;
        }
        let _w = self.writer.lock();
        let epochs = self.epochs.read().clone();
        let result = self.write_txn(|txn| {
            let mut t = EntryTables::open(txn)?;
            if let Some(c) = t.current(oid)?.filter(|c| {
                c.start == start && epochs.standing(c.generation, c.start) == Standing::Suspect
            }) {
                if keep {
                    t.put_current(
                        oid,
                        CurrentEntry {
                            generation: epochs.current,
                            ..c
                        },
                    )?;
                } else {
                    t.retire_current(oid, c, None)?;
                }
            }
            Ok(t.len()?)
        });
        match result {
            Ok(entries) => self.counters.entries.store(entries, Ordering::Relaxed),
            Err(e) => warn!(error = %e, %oid, "updating a cache entry after a pack failed"),
        }
    }

    /// For downstream `getInvalidations` across restarts: every oid changed after `tid`,
    /// with the latest tid, if the log reaches back that far; `None` otherwise.
    /// `Some((last_tid, []))` if `tid >= last_tid`.
    pub fn invalidations_since(&self, tid: Tid) -> Option<(Tid, Vec<Oid>)> {
        if self.is_poisoned() {
            return None;
        }
        self.read_invalidations_since(tid).unwrap_or_else(|e| {
            warn!(error = %e, "reading the invalidation log failed");
            None
        })
    }

    fn read_invalidations_since(&self, tid: Tid) -> Result<Option<(Tid, Vec<Oid>)>, CacheError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(index::META)?;
        let last = Tid(meta.get(index::META_LAST_TID)?.map_or(0, |g| g.value()));
        if tid >= last {
            return Ok(Some((last, Vec::new())));
        }
        let log = txn.open_table(index::INVALIDATIONS)?;
        // The log describes every change after its oldest entry, no earlier ones (that
        // entry may summarise changes since a tid the log no longer knows).
        match log.first()? {
            Some((oldest, _)) if oldest.value() <= tid.0 => {}
            _ => return Ok(None),
        }
        let mut oids = Vec::new();
        for item in log.range(tid.0 + 1..)? {
            let (_, packed) = item?;
            oids.extend(index::unpack_oids(packed.value()));
        }
        oids.sort_unstable();
        oids.dedup();
        Ok(Some((last, oids)))
    }

    /// The newest `n` log entries, oldest first (to seed the server's in-memory queue).
    pub fn recent_transactions(&self, n: usize) -> Vec<(Tid, Vec<Oid>)> {
        if self.is_poisoned() {
            return Vec::new();
        }
        self.read_recent_transactions(n).unwrap_or_else(|e| {
            warn!(error = %e, "reading the invalidation log failed");
            Vec::new()
        })
    }

    fn read_recent_transactions(&self, n: usize) -> Result<Vec<(Tid, Vec<Oid>)>, CacheError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(index::INVALIDATIONS)?;
        let mut out = Vec::new();
        for item in log.range::<u64>(..)?.rev().take(n) {
            let (tid, packed) = item?;
            out.push((
                Tid(tid.value()),
                index::unpack_oids(packed.value()).collect(),
            ));
        }
        out.reverse();
        Ok(out)
    }

    /// Makes everything so far durable: `fdatasync` of the segments written since the last
    /// flush, then a durable redb commit. Call periodically and at shutdown. Blocks.
    pub fn flush(&self) -> Result<(), CacheError> {
        if self.is_poisoned() {
            return Err(CacheError::Poisoned);
        }
        let mut w = self.writer.lock();
        self.presync(&mut w)?;
        let txn = self.db.begin_write()?;
        self.commit_durable(&mut w, txn)
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            entries: c.entries.load(Ordering::Relaxed),
            stores: c.stores.load(Ordering::Relaxed),
        }
    }

    /// Flushes and closes; records the active segment so that the next open continues it.
    /// (Dropping the cache flushes too, without that record.) Blocks.
    pub fn close(mut self) -> Result<(), CacheError> {
        self.closed = true;
        if self.is_poisoned() {
            return Err(CacheError::Poisoned);
        }
        let mut w = self.writer.lock();
        let txn = self.db.begin_write()?;
        if let Some(a) = &w.active {
            let mut meta = txn.open_table(index::META)?;
            meta.insert(index::META_CLEAN_SEG, a.seg)?;
            meta.insert(index::META_CLEAN_LEN, a.len)?;
        }
        self.commit_durable(&mut w, txn)
    }

    /// Runs `f` in a write transaction committed without durability.
    fn write_txn<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, CacheError>,
    ) -> Result<T, CacheError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let out = f(&txn)?;
        txn.commit()?;
        Ok(out)
    }

    /// Syncs the segments this commit may reference, then commits durably.
    fn commit_durable(&self, w: &mut Writer, mut txn: WriteTransaction) -> Result<(), CacheError> {
        for file in self.unsynced_files(w) {
            file.sync_data()?;
        }
        w.unsynced.clear();
        if w.dir_unsynced {
            self.fs.sync_dir(&self.segments_dir)?;
            w.dir_unsynced = false;
        }
        txn.set_durability(Durability::Immediate)?;
        txn.set_quick_repair(true);
        txn.commit()?;
        Ok(())
    }

    fn unsynced_files(&self, w: &Writer) -> Vec<Arc<dyn FileIo>> {
        let files = self.files.read();
        w.unsynced
            .iter()
            .filter_map(|seg| files.get(seg).cloned())
            .collect()
    }

    /// Syncs the segments written so far *without* holding the writer lock, so that the
    /// durable commit that follows (under the lock) only has to sync what was appended in
    /// the meantime: writers wait for that little, not for the whole dirty data. `unsynced`
    /// is left alone: `commit_durable` syncs all of it again, cheaply where nothing is dirty.
    fn presync(&self, w: &mut MutexGuard<'_, Writer>) -> Result<(), CacheError> {
        let files = self.unsynced_files(w);
        if files.is_empty() {
            return Ok(());
        }
        MutexGuard::unlocked(w, || files.iter().try_for_each(|f| f.sync_data()))?;
        Ok(())
    }

    /// Appends a record to the active segment (starting a new one if it is full).
    fn append(&self, w: &mut Writer, oid: Oid, start: Tid, data: &[u8]) -> Result<Loc, CacheError> {
        let record = segment::encode_record(oid, start, data);
        let len = record.len() as u64;
        if w.active
            .as_ref()
            .is_none_or(|a| a.len + len > self.segment_size)
        {
            self.roll(w)?;
        }
        let Some(a) = w.active.as_mut() else {
            return Err(CacheError::Corrupt("no active segment".into()));
        };
        a.file.write_all_at(&record, a.len)?;
        let loc = Loc {
            seg: a.seg,
            off: a.len as u32,
            len: data.len() as u32,
        };
        a.len += len;
        let seg = a.seg;
        *w.sizes.entry(seg).or_default() += len;
        w.total_bytes += len;
        w.unsynced.insert(seg);
        self.counters.bytes.store(w.total_bytes, Ordering::Relaxed);
        Ok(loc)
    }

    fn roll(&self, w: &mut Writer) -> Result<(), CacheError> {
        let seg = w.next_seg;
        w.next_seg += 1;
        let file = segment::create_segment(&*self.fs, &self.segments_dir, seg)?;
        self.files.write().insert(seg, file.clone());
        w.sizes.insert(seg, SEGMENT_HEADER_LEN);
        w.total_bytes += SEGMENT_HEADER_LEN;
        w.unsynced.insert(seg);
        w.dir_unsynced = true;
        w.active = Some(Active {
            seg,
            file,
            len: SEGMENT_HEADER_LEN,
        });
        Ok(())
    }

    /// Evicts the oldest segments until `need` more bytes (and a new segment's header) fit.
    /// Segments another writer is evicting (see `evict_segment`) are skipped; if only those
    /// are left, the cache exceeds its bound by a record or two until that eviction ends.
    fn make_room(&self, w: &mut MutexGuard<'_, Writer>, need: u64) -> Result<(), CacheError> {
        while w.total_bytes + need + SEGMENT_HEADER_LEN > self.max_bytes {
            let active = w.active.as_ref().map(|a| a.seg);
            let victim = w
                .sizes
                .keys()
                .copied()
                .find(|&s| Some(s) != active && !w.evicting.contains(&s));
            let Some(victim) = victim else { break };
            self.evict_segment(w, victim, true)?;
        }
        Ok(())
    }

    /// Removes segment `seg` and its entries, copying forward (with `second_chance`) the
    /// records read since they were written, then deletes the file after a durable commit.
    ///
    /// A big segment holds up to hundreds of thousands of entries. They are removed in
    /// batches of `EVICT_BATCH`, each its own (non-durable) transaction, and the writer lock
    /// is offered to waiting writers between batches, so an invalidation never waits for a
    /// whole eviction. Every batch leaves a consistent index (entries gone or moved).
    fn evict_segment(
        &self,
        w: &mut MutexGuard<'_, Writer>,
        seg: u64,
        second_chance: bool,
    ) -> Result<(), CacheError> {
        w.evicting.insert(seg);
        let result = self
            .evict_segment_batches(w, seg, second_chance)
            .and_then(|counts| {
                // Nothing refers to the victim's records any more: no need to sync them.
                w.unsynced.remove(&seg);
                self.presync(w)?;
                let txn = self.db.begin_write()?;
                self.commit_durable(w, txn)?;
                Ok(counts)
            });
        w.evicting.remove(&seg);
        let (evicted, copied) = result?;
        // No durable state mentions the segment any more: its file can go.
        self.files.write().remove(&seg);
        w.unsynced.remove(&seg);
        if let Some(size) = w.sizes.remove(&seg) {
            w.total_bytes -= size;
        }
        let path = segment::segment_path(&self.segments_dir, seg);
        if let Err(e) = self.fs.remove_file(&path) {
            if e.kind() != io::ErrorKind::NotFound {
                warn!(error = %e, path = %path.display(), "deleting an evicted cache segment failed");
            }
        }
        debug!(seg, evicted, copied, "evicted a cache segment");
        self.counters.bytes.store(w.total_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The batches of `evict_segment`; returns (dropped, copied) entry counts.
    fn evict_segment_batches(
        &self,
        w: &mut MutexGuard<'_, Writer>,
        seg: u64,
        second_chance: bool,
    ) -> Result<(u64, u64), CacheError> {
        let file = self.files.read().get(&seg).cloned();
        let mut hot = HashSet::new();
        let (mut evicted, mut copied) = (0u64, 0u64);
        let mut from = 0u32;
        loop {
            // Marks made by readers since the last batch count too.
            hot.extend(self.accessed.lock().take(seg));
            let mut txn = self.db.begin_write()?;
            txn.set_durability(Durability::None)?;
            let (next, dropped, entries) = {
                let mut t = EntryTables::open(&txn)?;
                let rows = t.segment_rows(seg, from, EVICT_BATCH)?;
                let next = rows.last().and_then(|&(off, _, _)| off.checked_add(1));
                let mut dropped = 0;
                for (off, oid, start) in rows {
                    let at = |l: Loc| l.seg == seg && l.off == off;
                    let loc = match t.current(oid)?.filter(|c| c.start == start && at(c.loc)) {
                        Some(c) => Some(c.loc),
                        None => t
                            .noncurrent(oid, start)?
                            .filter(|n| at(n.loc))
                            .map(|n| n.loc),
                    };
                    let Some(loc) = loc else {
                        t.locations.remove((seg, off))?; // a stray row; cannot happen
                        continue;
                    };
                    if second_chance && hot.contains(&off) {
                        let data = file
                            .as_ref()
                            .and_then(|f| segment::read_record(&**f, loc, oid, start).ok());
                        if let Some(data) = data {
                            let to = self.append(w, oid, start, &data)?;
                            t.relocate(oid, start, loc, to)?;
                            copied += 1;
                            continue;
                        }
                    }
                    t.remove_at(oid, start, loc)?;
                    dropped += 1;
                }
                (next, dropped, t.len()?)
            };
            txn.commit()?;
            evicted += dropped;
            self.counters
                .evictions
                .fetch_add(dropped, Ordering::Relaxed);
            self.counters.entries.store(entries, Ordering::Relaxed);
            let Some(next) = next else { break };
            from = next;
            MutexGuard::bump(w);
        }
        Ok((evicted, copied))
    }
}

impl Drop for Cache {
    /// Without `close`, still make everything durable in order: redb itself would make its
    /// pending commits durable on drop, without syncing the segments first.
    fn drop(&mut self) {
        if !self.closed && !self.is_poisoned() {
            if let Err(e) = self.flush() {
                warn!(error = %e, "flushing the proxy cache on drop failed");
            }
        }
    }
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("segments_dir", &self.segments_dir)
            .field("max_bytes", &self.max_bytes)
            .field("last_tid", &self.last_tid())
            .field("stats", &self.stats())
            .finish()
    }
}
