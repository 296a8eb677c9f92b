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
//!   session closes the connection.

use bytes::Bytes;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tokio::sync::{mpsc, Notify};
use zeo_proto::Encoding;
use zodb::Tid;

pub struct Outbox {
    pub encoding: Encoding,
    state: Mutex<OutState>,
    tx: mpsc::UnboundedSender<Bytes>,
    queued: AtomicUsize,
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
    pub fn new(encoding: Encoding, max_queued: usize) -> (Outbox, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Outbox {
                encoding,
                state: Mutex::new(OutState {
                    last_invalidation: Tid::ZERO,
                }),
                tx,
                queued: AtomicUsize::new(0),
                max_queued,
                overflowed: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                trouble: Notify::new(),
                drained: Notify::new(),
                drain_waiters: AtomicUsize::new(0),
            },
            rx,
        )
    }

    fn push(&self, frame: Bytes) {
        if self.closed.load(Ordering::Relaxed) {
            return;
        }
        let n = frame.len();
        let total = self.queued.fetch_add(n, Ordering::Relaxed) + n;
        if total > self.max_queued && !self.overflowed.swap(true, Ordering::Relaxed) {
            self.trouble.notify_one();
        }
        // A closed channel means the connection is going away; dropping the frame is fine.
        let _ = self.tx.send(frame);
    }

    /// Queues a frame with no ordering constraint.
    pub fn send(&self, frame: Bytes) {
        self.push(frame);
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

    /// Called by the writer after bytes have been written.
    pub fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        if self.drain_waiters.load(Ordering::Acquire) > 0 {
            self.drained.notify_waiters();
        }
    }

    /// Waits until at most `limit` bytes are queued, or the connection is closed. Lets a
    /// large response (a blob) be produced only as fast as the client reads it, with a
    /// bounded amount of it in memory.
    pub async fn wait_queued_below(&self, limit: usize) {
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
            // Registered before the check, so a write in between is not missed.
            notified.as_mut().enable();
            if self.queued_bytes() <= limit || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
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

    #[test]
    fn stale_load_replies_are_refused_after_a_newer_invalidation() {
        let (out, mut rx) = Outbox::new(Encoding::Pickle, 1 << 20);
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
        let (out, _rx) = Outbox::new(Encoding::Pickle, 10);
        out.send(Bytes::from_static(b"12345"));
        assert!(!out.is_overflowed());
        out.send(Bytes::from_static(b"123456"));
        assert!(out.is_overflowed());
    }
}
