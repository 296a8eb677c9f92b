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
mod invalidate;
mod open;
mod recent;
mod redb_file;
mod segment;
#[cfg(test)]
mod tests;
mod warm;
mod write;

pub use warm::WarmPosition;

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
