//! Filling the cache from upstream in the background (`--warm`), so that a new proxy
//! serves at local speed instead of paying a link round trip per object it is asked for.
//!
//! Only a zeors upstream can do it at a useful pace: it sends current records in bulk
//! (`zeors_current_records`, advertised in `get_info`). A stock server only has
//! `record_iternext`, one object per round trip, slower than the clients' own misses, so
//! over a stock upstream `--warm` does nothing and says so.
//!
//! ## Order and resumption
//! The oid space is walked in stripes of [`STRIPE`] oids, [`IN_FLIGHT`] stripes at a time,
//! each as a chain of requests of about [`BATCH_BYTES`] that continue where the previous
//! reply stopped. A reply also says where the next existing oid is, so gaps are skipped,
//! and that there is none, which ends the walk. The position recorded in the cache
//! ([`WarmPosition`]) is the lowest oid not yet stored of any stripe in progress; it is
//! advanced by the store thread after the records below it are stored. A restart resumes
//! from it (fetching again at most the stripes that were in progress), and a warm-up that
//! finished is not repeated: from then on invalidations and misses keep the cache.
//!
//! ## Consistency
//! Records are stored as current the way a miss's answer is (see the module docs of
//! [`super`]): as of the older of the reply's snapshot and the tid the connection had
//! seen, so that the cache refuses a record that an invalidation it already applied
//! overtook, and an invalidation that arrives later ends it. The pack epoch is checked as
//! for misses.
//!
//! ## Priority
//! Clients' misses come first: a warm request is sent only after no load has been in
//! flight upstream for [`CALM`], and at most [`IN_FLIGHT`] of them are outstanding, so a
//! miss that arrives meanwhile waits behind at most `IN_FLIGHT × BATCH_BYTES` on the link
//! (64 KB: 64 ms at 1 MB/s), and a client reading cold objects one after another pauses
//! the warm-up altogether. It also stops when the cache is [`FULL`]: warming more would
//! only evict what was warmed first.

use super::Inner;
use crate::cache::WarmPosition;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, info, warn};
use zeo_client::ClientError;
use zeo_proto::reply::CurrentRecords;
use zeo_proto::Request;
use zodb::Oid;

/// Oids per stripe: a restart fetches again at most this many objects per stripe that
/// was in progress.
const STRIPE: u64 = 256;
/// Stripes walked at once, hence warm requests outstanding at most: two keep a link of
/// 1 MB/s and 20 ms round trip busy with 32 KB replies.
const IN_FLIGHT: usize = 2;
/// Data asked for per request.
const BATCH_BYTES: u64 = 32 << 10;
/// How long upstream loads must have been idle before a warm request goes out.
const CALM: Duration = Duration::from_millis(25);
/// Share of the cache's bound at which warming stops.
const FULL: f64 = 0.9;
/// Pause before trying again after the link went down.
const RETRY: Duration = Duration::from_secs(1);
/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

/// The warm-up's figures (metrics) and the stripes in progress.
#[derive(Default)]
pub(super) struct Warming {
    /// Objects and bytes stored by the warm-up, since start.
    pub objects: AtomicU64,
    pub bytes: AtomicU64,
    /// The warm-up finished (now or before a restart).
    pub done: AtomicBool,
    /// The lowest oid not yet warmed (for metrics).
    pub position: AtomicU64,
    stripes: Mutex<Stripes>,
}

#[derive(Default)]
struct Stripes {
    /// First oid of the next stripe to hand out.
    next: u64,
    /// No oid at or after `next` exists.
    exhausted: bool,
    /// Stripes in progress: first oid → first oid not yet stored.
    active: BTreeMap<u64, u64>,
}

impl Stripes {
    fn take(&mut self) -> Option<(u64, u64)> {
        if self.exhausted || self.next == u64::MAX {
            return None;
        }
        let start = self.next;
        let end = start.saturating_add(STRIPE);
        self.next = end;
        self.active.insert(start, start);
        Some((start, end))
    }

    /// Every oid below this one is stored.
    fn watermark(&self) -> u64 {
        self.active.values().min().copied().unwrap_or(self.next)
    }
}

/// Why a stripe's walk stopped early.
enum Stop {
    Shutdown,
    /// Upstream refused (an error reply): the warm-up ends.
    Refused(String),
    Full,
}

impl Inner {
    /// Runs the warm-up to its end (or shutdown). Spawned at start with `--warm`.
    pub(super) async fn run_warm(self: Arc<Self>) {
        let w = &self.warming;
        let from = match self.cache.warm_position() {
            WarmPosition::Done => {
                info!("the proxy cache was warmed from upstream before; not again");
                w.done.store(true, Ordering::Relaxed);
                return;
            }
            WarmPosition::From(oid) => oid.0,
        };
        w.position.store(from, Ordering::Relaxed);
        // Upstream's abilities are known once it is reached.
        if self.link().await.is_err() && !self.wait_for_link().await {
            return;
        }
        if !self.link.bulk_reads.load(Ordering::Relaxed) {
            warn!("--warm: upstream sends no records in bulk (it is not zeors, or its storage cannot iterate its records); the cache is not warmed");
            return;
        }
        if from > 0 {
            info!(from_oid = %Oid(from), "resuming the warm-up of the proxy cache");
        } else {
            info!("warming the proxy cache from upstream in the background");
        }
        {
            let mut s = w.stripes.lock();
            s.next = from;
            s.exhausted = false;
            s.active.clear();
        }
        let began = Instant::now();
        let progress = {
            let inner = self.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PROGRESS_EVERY);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let w = &inner.warming;
                    info!(
                        objects = w.objects.load(Ordering::Relaxed),
                        mb = w.bytes.load(Ordering::Relaxed) / 1_000_000,
                        at_oid = %Oid(w.position.load(Ordering::Relaxed)),
                        "warming the proxy cache"
                    );
                }
            })
        };
        let walkers: Vec<_> = (0..IN_FLIGHT)
            .map(|_| {
                let inner = self.clone();
                tokio::spawn(async move { inner.walk_stripes().await })
            })
            .collect();
        let mut stop = None;
        for t in walkers {
            match t.await {
                Ok(Ok(())) => {}
                Ok(Err(s)) => stop = stop.or(Some(s)),
                Err(e) => stop = stop.or(Some(Stop::Refused(e.to_string()))),
            }
        }
        progress.abort();
        let objects = w.objects.load(Ordering::Relaxed);
        let mb = w.bytes.load(Ordering::Relaxed) / 1_000_000;
        match stop {
            None => {
                self.stores
                    .run_in_order(|cache| cache.set_warm_position(WarmPosition::Done))
                    .await;
                w.done.store(true, Ordering::Relaxed);
                info!(
                    objects,
                    mb,
                    seconds = began.elapsed().as_secs(),
                    "the proxy cache is warm"
                );
            }
            Some(Stop::Shutdown) => {}
            Some(Stop::Full) => warn!(
                objects,
                mb,
                at_oid = %Oid(w.position.load(Ordering::Relaxed)),
                "the proxy cache is {:.0}% full: warming stops (a larger --cache-size would hold more)",
                FULL * 100.0
            ),
            Some(Stop::Refused(e)) => {
                error!(error = %e, "warming the proxy cache failed; it is no longer warmed")
            }
        }
    }

    /// Waits until the link is up again; false at shutdown.
    async fn wait_for_link(&self) -> bool {
        loop {
            if *self.link.shutdown.borrow() {
                return false;
            }
            if self.link().await.is_ok() {
                return true;
            }
            tokio::time::sleep(RETRY).await;
        }
    }

    /// Walks stripes until none is left.
    async fn walk_stripes(self: Arc<Self>) -> Result<(), Stop> {
        loop {
            let Some((start, end)) = self.warming.stripes.lock().take() else {
                return Ok(());
            };
            self.walk_stripe(start, end).await?;
        }
    }

    /// Fetches and stores the current records of the oids in `[start, end)`.
    async fn walk_stripe(self: &Arc<Self>, start: u64, end: u64) -> Result<(), Stop> {
        let mut cursor = start;
        loop {
            if *self.link.shutdown.borrow() {
                return Err(Stop::Shutdown);
            }
            let max = self.config.cache.max_bytes as f64;
            if self.cache.stats().bytes as f64 >= FULL * max {
                return Err(Stop::Full);
            }
            self.fetching.quiet(CALM).await;
            let conn = match self.link().await {
                Ok(c) => c,
                Err(_) => {
                    if !self.wait_for_link().await {
                        return Err(Stop::Shutdown);
                    }
                    continue;
                }
            };
            let floor = self.last_tid();
            let epoch = self.packs.epoch();
            let request = Request::CurrentRecords {
                first: Oid(cursor),
                end: Some(Oid(end)),
                max_bytes: BATCH_BYTES,
            };
            let (reply, seen) = match conn.request_with_seen::<CurrentRecords>(&request).await {
                Ok(r) => r,
                Err(ClientError::Remote(e)) => return Err(Stop::Refused(format!("{e:?}"))),
                Err(e) => {
                    warn!(error = %e, "a warm-up request failed; trying again");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
            // As of what the answer is current: see the module docs.
            let seen = reply.snapshot.min(seen.max(floor));
            let finished = reply.next.is_none_or(|n| n.0 >= end);
            let next = match reply.next {
                Some(n) if n.0 < end => n.0,
                _ => end,
            };
            let objects = reply.records.len() as u64;
            let bytes: u64 = reply.records.iter().map(|r| r.2.len() as u64).sum();
            let inner = self.clone();
            self.stores
                .run_in_order(move |cache| {
                    if epoch.still_valid() {
                        for (oid, tid, data) in reply.records {
                            cache.store(oid, tid, None, data, seen);
                        }
                    }
                    let watermark = {
                        let mut s = inner.warming.stripes.lock();
                        if finished {
                            s.active.remove(&start);
                        } else {
                            s.active.insert(start, next);
                        }
                        s.watermark()
                    };
                    inner.warming.position.store(watermark, Ordering::Relaxed);
                    cache.set_warm_position(WarmPosition::From(Oid(watermark)));
                })
                .await;
            let w = &self.warming;
            w.objects.fetch_add(objects, Ordering::Relaxed);
            w.bytes.fetch_add(bytes, Ordering::Relaxed);
            match reply.next {
                None => {
                    self.warming.stripes.lock().exhausted = true;
                    return Ok(());
                }
                Some(n) if n.0 >= end => {
                    // Nothing exists between this stripe and `n`: skip to it.
                    let mut s = self.warming.stripes.lock();
                    s.next = s.next.max(n.0);
                    return Ok(());
                }
                Some(_) => cursor = next,
            }
        }
    }
}
