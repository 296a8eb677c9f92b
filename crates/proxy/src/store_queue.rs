//! Cache writes off the request path, one at a time, from a bounded queue.
//!
//! Storing a record may make the cache evict a segment, which holds its writer lock for a
//! while. When every store was a `spawn_blocking` task of its own, the stores arriving
//! during an eviction each took another blocking-pool thread to wait on that lock (a soak
//! through a proxy with a small cache grew to 51 threads), and every new thread brought a
//! malloc arena that kept its memory: the proxy's memory rose with each burst. The
//! stores serialize on that lock anyway, so one thread does them all. The queue is
//! bounded in jobs and in bytes; a store that does not fit is skipped and counted — it is
//! a cache, and the object is fetched again when it is next asked for.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use tracing::error;

use crate::cache::Cache;

/// Jobs that may wait for the store thread.
const MAX_JOBS: usize = 4096;
/// Bytes of record data that may wait for the store thread.
const MAX_BYTES: usize = 64 << 20;

type Run = Box<dyn FnOnce(&Cache) + Send>;

struct Job {
    bytes: usize,
    run: Run,
}

/// The queue in front of the store thread. Dropping it lets the thread finish what is
/// queued and exit.
pub(crate) struct StoreQueue {
    tx: SyncSender<Job>,
    queued_bytes: Arc<AtomicUsize>,
    skipped: AtomicU64,
}

impl StoreQueue {
    /// Starts the store thread for `cache`.
    pub fn start(cache: Arc<Cache>) -> std::io::Result<StoreQueue> {
        let (tx, rx) = sync_channel::<Job>(MAX_JOBS);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let done_bytes = queued_bytes.clone();
        std::thread::Builder::new()
            .name("cache-store".into())
            .spawn(move || {
                for job in rx {
                    // A panic is a bug in the cache; it poisons itself where that matters.
                    // The thread must outlive it, or every later store would be skipped.
                    if catch_unwind(AssertUnwindSafe(|| (job.run)(&cache))).is_err() {
                        error!("a proxy cache store panicked");
                    }
                    done_bytes.fetch_sub(job.bytes, Ordering::AcqRel);
                }
            })?;
        Ok(StoreQueue {
            tx,
            queued_bytes,
            skipped: AtomicU64::new(0),
        })
    }

    /// Queues `run`, which holds `bytes` of record data, for the store thread. Returns
    /// false, dropping `run`, if the queue is full.
    pub fn submit(&self, bytes: usize, run: impl FnOnce(&Cache) + Send + 'static) -> bool {
        let before = self.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
        // One record bigger than the whole budget still goes through an empty queue.
        let fits = before == 0 || before + bytes <= MAX_BYTES;
        let sent = fits
            && match self.tx.try_send(Job {
                bytes,
                run: Box::new(run),
            }) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            };
        if !sent {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        sent
    }

    /// Like [`StoreQueue::submit`], and returns once `run` has run, or at once if it was
    /// skipped.
    pub async fn submit_and_wait(&self, bytes: usize, run: impl FnOnce(&Cache) + Send + 'static) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        // A skipped job is dropped with its sender, which ends the wait too.
        self.submit(bytes, move |cache| {
            run(cache);
            let _ = done_tx.send(());
        });
        let _ = done_rx.await;
    }

    /// Runs `run` on the store thread after the jobs queued before it, and returns once it
    /// has run. Never skipped: when the queue is full it waits for room (for the jobs
    /// that must happen, in order with the stores, such as marking what a pack removed).
    pub async fn run_in_order(&self, run: impl FnOnce(&Cache) + Send + 'static) {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let job = Job {
            bytes: 0,
            run: Box::new(move |cache| {
                run(cache);
                let _ = done_tx.send(());
            }),
        };
        let tx = self.tx.clone();
        // A send error means the store thread is gone: the job is dropped and so is
        // `done_tx`, which ends the wait.
        let _ = tokio::task::spawn_blocking(move || tx.send(job)).await;
        let _ = done_rx.await;
    }

    /// Stores skipped because the queue was full.
    pub fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheConfig;
    use std::sync::mpsc::channel;
    use std::time::Duration;
    use zodb::{Oid, Tid};

    #[test]
    fn stores_run_in_order_on_one_thread_and_a_full_queue_skips() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap());
        let q = StoreQueue::start(cache.clone()).unwrap();
        // Hold the thread until the queue has filled.
        let (release_tx, release_rx) = channel::<()>();
        assert!(q.submit(0, move |_| {
            release_rx.recv().unwrap();
        }));
        let (seen_tx, seen_rx) = channel();
        let mut accepted = 0;
        for i in 0..MAX_JOBS + 10 {
            let seen_tx = seen_tx.clone();
            if q.submit(1, move |_| seen_tx.send(i).unwrap()) {
                accepted += 1;
            }
        }
        // The blocked job may or may not still be in the channel when the others arrive.
        assert!((MAX_JOBS - 1..=MAX_JOBS).contains(&accepted), "{accepted}");
        assert_eq!(q.skipped(), (MAX_JOBS + 10 - accepted) as u64);
        release_tx.send(()).unwrap();
        let got: Vec<usize> = (0..accepted)
            .map(|_| seen_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "in submission order");
        // A real store goes through, and a panicking job does not stop the thread.
        assert!(q.submit(0, |_| panic!("test panic")));
        let (done_tx, done_rx) = channel();
        assert!(q.submit(3, move |c| {
            // A non-current revision: a new cache checks no "current" answer yet.
            c.store(
                Oid(7),
                Tid(1),
                Some(Tid(2)),
                bytes::Bytes::from_static(b"abc"),
                Tid(1),
            );
            done_tx.send(()).unwrap();
        }));
        done_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(cache.load_before(Oid(7), Tid(2)).is_some());
    }

    #[test]
    fn the_byte_budget_bounds_what_waits() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(Cache::open(CacheConfig::new(dir.path(), 1 << 20)).unwrap());
        let q = StoreQueue::start(cache).unwrap();
        let (release_tx, release_rx) = channel::<()>();
        // A job bigger than the budget is taken by an empty queue...
        assert!(q.submit(MAX_BYTES + 1, move |_| {
            release_rx.recv().unwrap();
        }));
        // ...and nothing more fits behind it until it is done.
        assert!(!q.submit(1, |_| {}));
        release_tx.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !q.submit(1, |_| {}) {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
