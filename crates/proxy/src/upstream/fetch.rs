//! Loads: from the cache, or fetched upstream (shared between concurrent misses of the
//! same revision), and the prefetch of what a fetched record references.

use super::Inner;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use zodb::{LoadBefore, Loaded, Oid, StorageError, Tid};

/// Prefetches in flight at most, across all misses: a bound on the link share and on the
/// requests queued ahead of real misses.
const PREFETCH_IN_FLIGHT: usize = 128;

/// Prefetched oids remembered until asked for; past this many (prefetches that were not
/// needed), the memory is cleared.
const UNCLAIMED_MAX: usize = 100_000;

/// What upstream answered to `loadBefore`: the revision, and the tid it reflects.
type Fetched = (Option<Loaded>, Tid);

type FetchWaiter = tokio::sync::oneshot::Sender<Result<Fetched, StorageError>>;

/// Loads in flight upstream, prefetches, and the figures of both.
pub(super) struct Fetching {
    /// Upstream loads in flight, with the requests waiting for each.
    inflight: Mutex<HashMap<(Oid, Tid), Vec<FetchWaiter>>>,
    /// Prefetches in flight by oid; a miss on one of them waits for it (the receiver
    /// sees `true` once the object is in the cache, or the sender dropped).
    prefetching: Mutex<HashMap<Oid, watch::Receiver<bool>>>,
    prefetch_slots: Arc<tokio::sync::Semaphore>,
    /// Oids prefetched and not asked for yet. When one is asked for, the traversal that
    /// prefetch bet on is real, and its references are prefetched in turn: one level at a
    /// time, driven by what clients load, never a walk of the whole database.
    unclaimed: Mutex<HashSet<Oid>>,
    any_unclaimed: AtomicBool,
    /// Objects prefetched, and loads that found theirs being prefetched or prefetched.
    pub prefetched: AtomicU64,
    /// Loads answered from the cache / fetched upstream.
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Woken when the last upstream load in flight completes (see [`Fetching::quiet`]).
    idle: tokio::sync::Notify,
    /// When the last upstream load completed.
    last_done: Mutex<Instant>,
}

impl Fetching {
    pub fn new() -> Fetching {
        Fetching {
            inflight: Mutex::new(HashMap::new()),
            prefetching: Mutex::new(HashMap::new()),
            prefetch_slots: Arc::new(tokio::sync::Semaphore::new(PREFETCH_IN_FLIGHT)),
            unclaimed: Mutex::new(HashSet::new()),
            any_unclaimed: AtomicBool::new(false),
            prefetched: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            idle: tokio::sync::Notify::new(),
            last_done: Mutex::new(Instant::now()),
        }
    }

    /// Returns once no load has been in flight upstream for `calm`: the moment background
    /// traffic (the warm-up) may use the link without delaying a client's miss more than
    /// the little it already has in flight. A client reading cold objects one after the
    /// other misses again within a link round trip, so such a reader keeps it waiting.
    pub async fn quiet(&self, calm: Duration) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.inflight.lock().is_empty() {
                notified.await;
                continue;
            }
            let since = self.last_done.lock().elapsed();
            if since >= calm {
                return;
            }
            tokio::time::sleep(calm - since).await;
        }
    }
}

/// The error a waiter of a shared fetch gets (errors are not `Clone`).
fn share_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::PosKey(oid) => StorageError::PosKey(*oid),
        StorageError::Disconnected(m) => StorageError::Disconnected(m.clone()),
        other => StorageError::Remote {
            class_path: "ZODB.POSException.StorageError".into(),
            message: other.to_string(),
        },
    }
}

impl Inner {
    pub(super) async fn load_before(
        self: &Arc<Self>,
        oid: Oid,
        before: Tid,
    ) -> zodb::Result<LoadBefore> {
        let f = &self.fetching;
        let snapshot = self.last_tid();
        // Looked up on the calling thread: an index read and one positioned read that
        // the page cache nearly always serves (see FileStorage's loads for the measure).
        let hit = match self.cache.load_before(oid, before) {
            Some(rev) => {
                f.hits.fetch_add(1, Ordering::Relaxed);
                Some(rev)
            }
            None => {
                f.misses.fetch_add(1, Ordering::Relaxed);
                match self.await_prefetch(oid, before).await {
                    Some(rev) => Some(rev),
                    None => self.verified_suspect(oid, before).await,
                }
            }
        };
        if let Some(rev) = hit {
            self.claim(oid, &rev.data);
            return Ok(LoadBefore {
                revision: Some(rev),
                snapshot,
            });
        }
        let epoch = self.packs.epoch();
        let (answer, seen) = self.fetch(oid, before).await?;
        if let Some(rev) = &answer {
            if rev.end.is_none() {
                self.prefetch_references(&rev.data);
            }
            let stored = rev.clone();
            self.stores.submit(stored.data.len(), move |cache| {
                // Not if a pack completed since the request went out (see `pack`).
                if epoch.still_valid() {
                    cache.store(oid, stored.start, stored.end, stored.data, seen)
                }
            });
        }
        Ok(LoadBefore {
            revision: answer,
            snapshot: seen,
        })
    }

    /// `loadBefore` upstream, shared: concurrent misses of the same revision (several
    /// front-ends warming up on the same pages) cross the slow link once. The request
    /// runs in its own task so that a client disconnecting mid-way cannot strand the
    /// others waiting for it.
    async fn fetch(self: &Arc<Self>, oid: Oid, before: Tid) -> Result<Fetched, StorageError> {
        let key = (oid, before);
        let waiter = {
            let mut inflight = self.fetching.inflight.lock();
            match inflight.get_mut(&key) {
                Some(waiters) => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    waiters.push(tx);
                    Some(rx)
                }
                None => {
                    inflight.insert(key, Vec::new());
                    None
                }
            }
        };
        if let Some(rx) = waiter {
            return rx.await.unwrap_or_else(|_| {
                Err(StorageError::Disconnected(
                    "upstream fetch abandoned".into(),
                ))
            });
        }
        let inner = self.clone();
        let task = tokio::spawn(async move {
            let result = match inner.link().await {
                Ok(conn) => {
                    // Every transaction applied before the request is sent is committed
                    // upstream and reflected in the answer, our own commits included, of
                    // which upstream sends us no invalidation: the connection's `seen`
                    // alone stays below a commit made through this proxy until someone
                    // else commits, and an answer about an object that commit changed
                    // would be refused as overtaken and the load retried forever
                    // (whenever the cache could not keep the committed state: a full
                    // disk, a record too big for it).
                    let floor = inner.last_tid();
                    conn.load_before(oid, before)
                        .await
                        .map(|(answer, seen)| (answer, seen.max(floor)))
                        .map_err(StorageError::from)
                }
                Err(e) => Err(e),
            };
            let waiters = {
                let f = &inner.fetching;
                let mut inflight = f.inflight.lock();
                let waiters = inflight.remove(&key).unwrap_or_default();
                if inflight.is_empty() {
                    *f.last_done.lock() = Instant::now();
                    f.idle.notify_waiters();
                }
                waiters
            };
            for w in waiters {
                let _ = w.send(match &result {
                    Ok(f) => Ok(f.clone()),
                    Err(e) => Err(share_error(e)),
                });
            }
            result
        });
        task.await
            .unwrap_or_else(|e| Err(StorageError::Io(std::io::Error::other(e))))
    }

    /// Starts fetching the objects `data` references that the cache lacks, at most
    /// `config.prefetch` of them and [`PREFETCH_IN_FLIGHT`] in all.
    ///
    /// A ZODB client that loads an object nearly always loads what it references next (a
    /// BTree's buckets, a folder's items, a page's parts), one object per round trip of
    /// the slow link, since each of its threads has one load in flight. Fetching those
    /// references as soon as the record that names them arrives overlaps those round
    /// trips: a cold traversal costs about one round trip per level instead of per
    /// object. The fetches go through the same path as misses, so what lands in the
    /// cache is exactly what a miss would have stored.
    fn prefetch_references(self: &Arc<Self>, data: &[u8]) {
        let wanted = self.config.prefetch;
        if wanted == 0 {
            return;
        }
        let Ok(refs) = zodb::refs::references(data) else {
            return;
        };
        let f = &self.fetching;
        let mut started = 0;
        for oid in refs {
            if started == wanted {
                break;
            }
            if f.prefetching.lock().contains_key(&oid) || self.cache.has_current(oid) {
                continue;
            }
            let Ok(permit) = f.prefetch_slots.clone().try_acquire_owned() else {
                break;
            };
            let (done, waiting) = watch::channel(false);
            {
                let mut prefetching = f.prefetching.lock();
                if prefetching.contains_key(&oid) {
                    continue;
                }
                prefetching.insert(oid, waiting);
            }
            started += 1;
            let inner = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let epoch = inner.packs.epoch();
                if let Ok((Some(rev), seen)) = inner.fetch(oid, Tid::MAX).await {
                    let f = &inner.fetching;
                    f.prefetched.fetch_add(1, Ordering::Relaxed);
                    {
                        let mut unclaimed = f.unclaimed.lock();
                        if unclaimed.len() >= UNCLAIMED_MAX {
                            unclaimed.clear();
                        }
                        unclaimed.insert(oid);
                        f.any_unclaimed.store(true, Ordering::Release);
                    }
                    inner
                        .stores
                        .submit_and_wait(rev.data.len(), move |cache| {
                            if epoch.still_valid() {
                                cache.store(oid, rev.start, rev.end, rev.data, seen)
                            }
                        })
                        .await;
                }
                inner.fetching.prefetching.lock().remove(&oid);
                let _ = done.send(true);
            });
        }
    }

    /// A load found `oid` in the cache: if it got there by prefetch, the bet paid off and
    /// what it references is fetched next.
    fn claim(self: &Arc<Self>, oid: Oid, data: &[u8]) {
        let f = &self.fetching;
        if !f.any_unclaimed.load(Ordering::Acquire) {
            return;
        }
        let claimed = {
            let mut unclaimed = f.unclaimed.lock();
            let found = unclaimed.remove(&oid);
            if unclaimed.is_empty() {
                f.any_unclaimed.store(false, Ordering::Release);
            }
            found
        };
        if claimed {
            self.prefetch_references(data);
        }
    }

    /// A cached revision that a pack made suspect (see [`super::pack`]), if upstream
    /// still has it as current; `None` (a miss) otherwise, or if upstream cannot say.
    async fn verified_suspect(&self, oid: Oid, before: Tid) -> Option<Loaded> {
        let rev = self.cache.load_suspect(oid, before)?;
        match self.verify_suspect(oid, rev.start).await {
            Ok(true) => Some(rev),
            Ok(false) | Err(_) => None,
        }
    }

    /// When `oid` is being prefetched: waits for that, then looks in the cache again.
    async fn await_prefetch(&self, oid: Oid, before: Tid) -> Option<Loaded> {
        let mut waiting = self.fetching.prefetching.lock().get(&oid)?.clone();
        // An error means the prefetch task is gone: look anyway.
        let _ = waiting.wait_for(|done| *done).await;
        self.cache.load_before(oid, before)
    }
}
