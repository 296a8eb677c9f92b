//! A session's outgoing queue.
//!
//! Everything a connection sends — replies, callbacks, invalidations — goes through its
//! outbox and is written by one writer task in queue order. Two rules live here:
//!
//! * **Ordering of loads and invalidations.** A load reply that says "current" must reach
//!   the client before the invalidation of any transaction that makes it stale. Loads run
//!   concurrently and without locks, so instead of holding a lock across the read, the
//!   reply carries the storage snapshot it was computed from; the outbox refuses it if an
//!   invalidation for a later transaction has already been queued, and the session simply
//!   loads again. The check and the push happen under one mutex that the fan-out also
//!   takes, so they are atomic with respect to invalidations.
//! * **Bounded memory.** A client that stops reading must not make the server buffer
//!   without limit. Past `max_queued` bytes the outbox marks itself overflowed and the
//!   session closes the connection. Many clients together are bounded by the
//!   server-wide [`QueueBudget`]: while the output queued for all connections exceeds
//!   it, a connection with more than [`PAUSE_FLOOR`] bytes of its own waiting is not read
//!   from and its requests are not started ([`Outbox::admit`]) until either drains. A
//!   request admitted adds at most its one reply, so the queued total stays within the
//!   budget plus one reply per connection; clients that read their replies keep being
//!   served throughout, since their own queues stay below the floor.
//!
//! Every byte queued is counted in the outbox's [`Queued`] and in the budget until the
//! writer has written it or the queue is dropped unwritten (the count outlives the
//! outbox while the writer still holds frames).

use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::{mpsc, Notify};
use zeo_proto::Encoding;
use zodb::Tid;

/// A connection may always have this much output waiting and still be read from, however
/// full the server-wide budget is: a client that reads its replies is never paused.
pub const PAUSE_FLOOR: usize = 1 << 20;

/// The server-wide bound on output queued for clients.
pub struct QueueBudget {
    total: AtomicUsize,
    limit: usize,
    /// Woken when the total falls back to the limit.
    below: Notify,
    /// Connections currently not read from because of the budget (a gauge).
    pub paused: AtomicUsize,
    /// Times a connection was paused (a counter).
    pub pauses: std::sync::atomic::AtomicU64,
}

impl QueueBudget {
    pub fn new(limit: usize) -> QueueBudget {
        QueueBudget {
            total: AtomicUsize::new(0),
            limit,
            below: Notify::new(),
            paused: AtomicUsize::new(0),
            pauses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Bytes queued for all connections.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn exceeded(&self) -> bool {
        self.total() > self.limit
    }

    fn take(&self, n: usize) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    fn release(&self, n: usize) {
        let before = self.total.fetch_sub(n, Ordering::AcqRel);
        if before > self.limit && before - n <= self.limit {
            self.below.notify_waiters();
        }
    }
}

/// One connection's queued byte count, shared by its outbox and its writer, and charged
/// to the budget: whatever is still counted when both are gone (frames never written)
/// is given back then.
pub struct Queued {
    bytes: AtomicUsize,
    budget: std::sync::Arc<QueueBudget>,
}

impl Queued {
    fn add(&self, n: usize) -> usize {
        self.budget.take(n);
        self.bytes.fetch_add(n, Ordering::Relaxed) + n
    }

    /// `n` bytes were written (or dropped unwritten).
    pub fn sub(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        self.budget.release(n);
    }

    pub fn get(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        let left = self.bytes.swap(0, Ordering::Relaxed);
        if left > 0 {
            self.budget.release(left);
        }
    }
}

/// The queue entry that tells the writer to compress what follows: empty, unlike every
/// frame (a frame has at least its 4-byte length).
pub const COMPRESS_FROM_HERE: Bytes = Bytes::new();

pub struct Outbox {
    pub encoding: Encoding,
    state: Mutex<OutState>,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: std::sync::Arc<Queued>,
    max_queued: usize,
    overflowed: AtomicBool,
    /// Set when the connection can no longer be written to; further frames are dropped.
    closed: AtomicBool,
    /// Woken when the outbox overflows or the writer fails, so the session can close the
    /// connection.
    pub trouble: Notify,
    /// Woken after writes while someone waits for the queue to drain (a blob being
    /// streamed, see [`Outbox::wait_queued_below`]).
    drained: Notify,
    drain_waiters: AtomicUsize,
    /// When the writer last completed a write (for the idle timeout).
    last_written: Mutex<std::time::Instant>,
}

struct OutState {
    /// The tid of the last invalidation queued (or, at registration, the tid the client
    /// was told is current).
    last_invalidation: Tid,
}

/// The load reply was computed from a snapshot older than an invalidation already queued.
#[derive(Debug)]
pub struct Stale;

impl Outbox {
    /// An outbox charging `budget`; the writer gets the receiving end of the queue and
    /// the byte count it must decrease as it writes ([`Queued::sub`]).
    pub fn new(
        encoding: Encoding,
        max_queued: usize,
        budget: std::sync::Arc<QueueBudget>,
    ) -> (
        Outbox,
        mpsc::UnboundedReceiver<Bytes>,
        std::sync::Arc<Queued>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = std::sync::Arc::new(Queued {
            bytes: AtomicUsize::new(0),
            budget,
        });
        (
            Outbox {
                encoding,
                state: Mutex::new(OutState {
                    last_invalidation: Tid::ZERO,
                }),
                tx,
                queued: queued.clone(),
                max_queued,
                overflowed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                trouble: Notify::new(),
                drained: Notify::new(),
                drain_waiters: AtomicUsize::new(0),
                last_written: Mutex::new(std::time::Instant::now()),
            },
            rx,
            queued,
        )
    }

    fn push(&self, frame: Bytes) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let n = frame.len();
        let total = self.queued.add(n);
        if total > self.max_queued && !self.overflowed.swap(true, Ordering::Relaxed) {
            self.trouble.notify_one();
        }
        // A closed channel means the connection is going away; dropping the frame is fine.
        if self.tx.send(frame).is_err() {
            self.queued.sub(n);
        }
    }

    /// Queues a frame with no ordering constraint.
    pub fn send(&self, frame: Bytes) {
        self.push(frame);
    }

    /// Queues `frame` as the last one written plain: the writer compresses everything
    /// queued after it (see `zeo_proto::compress`). Under the ordering lock, so that no
    /// invalidation slips in between the frame and the switch.
    pub fn send_then_compress(&self, frame: Bytes) {
        let _st = self.state.lock();
        self.push(frame);
        self.push(COMPRESS_FROM_HERE);
    }

    /// Queues a load reply computed from `snapshot`, unless an invalidation for a later
    /// transaction has been queued since.
    pub fn send_load_reply(&self, frame: Bytes, snapshot: Tid) -> Result<(), Stale> {
        let st = self.state.lock();
        if st.last_invalidation > snapshot {
            return Err(Stale);
        }
        self.push(frame);
        Ok(())
    }

    /// Queues an invalidation (`frame` is `None` for the committer, who is not sent one
    /// but whose ordering point still advances).
    pub fn send_invalidation(&self, tid: Tid, frame: Option<Bytes>) {
        let mut st = self.state.lock();
        if tid > st.last_invalidation {
            st.last_invalidation = tid;
        }
        if let Some(f) = frame {
            self.push(f);
        }
    }

    /// Sets the ordering point at registration: the client has been told `tid` is current.
    pub fn set_registered_tid(&self, tid: Tid) {
        self.state.lock().last_invalidation = tid;
    }

    /// Called by the writer after bytes have been written (and counted off with
    /// [`Queued::sub`]): wakes those waiting for the queue to drain.
    pub fn written(&self) {
        *self.last_written.lock() = std::time::Instant::now();
        if self.drain_waiters.load(Ordering::Acquire) > 0 {
            self.drained.notify_waiters();
        }
    }

    /// Whether this connection must wait for the server-wide budget: the total is over
    /// it and this connection has more than [`PAUSE_FLOOR`] bytes of its own waiting.
    pub fn over_budget(&self) -> bool {
        self.queued.budget.exceeded() && self.queued_bytes() > PAUSE_FLOOR
    }

    /// Waits until this connection may start a request: at once unless it is
    /// [over budget](Outbox::over_budget), else until the budget or its own queue has
    /// drained (or the connection is closed).
    pub async fn admit(&self) {
        if !self.over_budget() {
            return;
        }
        self.wait_for(|| !self.over_budget(), true).await
    }

    /// Waits until at most `limit` bytes are queued, or the connection is closed. Lets a
    /// large response (a blob) be produced only as fast as the client reads it, with a
    /// bounded amount of it in memory.
    pub async fn wait_queued_below(&self, limit: usize) {
        self.wait_for(|| self.queued_bytes() <= limit, false).await
    }

    /// Waits until `done()` holds or the connection is closed, re-checking after every
    /// write (and, with `budget`, whenever the server-wide total falls back to its
    /// limit).
    async fn wait_for(&self, done: impl Fn() -> bool, budget: bool) {
        /// Counts the waiter for as long as it waits, even if its future is dropped.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.drain_waiters.fetch_add(1, Ordering::AcqRel);
        let _waiting = Waiting(&self.drain_waiters);
        loop {
            let notified = self.drained.notified();
            tokio::pin!(notified);
            let below = self.queued.budget.below.notified();
            tokio::pin!(below);
            // Registered before the check, so a write in between is not missed.
            notified.as_mut().enable();
            if budget {
                below.as_mut().enable();
            }
            if done() || self.is_closed() {
                return;
            }
            if budget {
                tokio::select! {
                    _ = notified => {}
                    _ = below => {}
                }
            } else {
                notified.await;
            }
        }
    }

    /// When the writer last completed a write (the outbox's creation before any).
    pub fn last_written(&self) -> std::time::Instant {
        *self.last_written.lock()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.get()
    }

    /// The writer lost the connection: drop whatever is queued from now on.
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::Relaxed) {
            self.trouble.notify_one();
            self.drained.notify_waiters();
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn budget(limit: usize) -> Arc<QueueBudget> {
        Arc::new(QueueBudget::new(limit))
    }

    #[test]
    fn stale_load_replies_are_refused_after_a_newer_invalidation() {
        let (out, mut rx, _) = Outbox::new(Encoding::Pickle, 1 << 20, budget(1 << 30));
        out.set_registered_tid(Tid(10));
        assert!(out
            .send_load_reply(Bytes::from_static(b"a"), Tid(10))
            .is_ok());
        out.send_invalidation(Tid(11), Some(Bytes::from_static(b"inv")));
        assert!(out
            .send_load_reply(Bytes::from_static(b"b"), Tid(10))
            .is_err());
        assert!(out
            .send_load_reply(Bytes::from_static(b"c"), Tid(11))
            .is_ok());
        let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(
            got,
            vec![
                Bytes::from_static(b"a"),
                Bytes::from_static(b"inv"),
                Bytes::from_static(b"c")
            ]
        );
    }

    #[test]
    fn overflow_is_flagged() {
        let (out, _rx, _) = Outbox::new(Encoding::Pickle, 10, budget(1 << 30));
        out.send(Bytes::from_static(b"12345"));
        assert!(!out.is_overflowed());
        out.send(Bytes::from_static(b"123456"));
        assert!(out.is_overflowed());
    }

    #[tokio::test]
    async fn the_budget_pauses_only_connections_with_output_waiting_and_is_given_back() {
        let b = budget(3 << 20);
        let (big, rx_big, q_big) = Outbox::new(Encoding::Pickle, 1 << 30, b.clone());
        let (small, _rx_small, _q_small) = Outbox::new(Encoding::Pickle, 1 << 30, b.clone());
        for _ in 0..4 {
            big.send(Bytes::from(vec![0u8; 1 << 20]));
        }
        small.send(Bytes::from_static(b"reply"));
        assert_eq!(b.total(), (4 << 20) + 5);
        assert!(big.over_budget(), "4 MiB waiting with the budget exceeded");
        assert!(
            !small.over_budget(),
            "a connection below the floor is always served"
        );
        // The writer writes two frames: the total falls to the limit and admits again.
        let admitted = tokio::spawn({
            let big = Arc::new(big);
            let waiter = big.clone();
            async move {
                waiter.admit().await;
                big
            }
        });
        tokio::task::yield_now().await;
        assert!(!admitted.is_finished());
        q_big.sub(1 << 20);
        q_big.sub(1 << 20);
        let big = tokio::time::timeout(std::time::Duration::from_secs(5), admitted)
            .await
            .expect("admitted once the budget has room")
            .unwrap();
        assert!(!big.over_budget());
        // What was never written is given back when the queue goes away.
        drop(rx_big);
        drop(big);
        drop(q_big);
        assert_eq!(b.total(), 5);
    }
}
