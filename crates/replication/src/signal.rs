//! The last transaction a node has published, for whoever waits for the next one.
//!
//! Invariant: the value only grows, and it is set *after* the storage has published the
//! transaction (index and last tid), so a waiter that wakes up can read it: a feeder
//! thread making a new iterator, a forwarded commit waiting to read its own write.

use parking_lot::{Condvar, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use zodb::Tid;

pub struct CommitSignal {
    last: Mutex<Tid>,
    cv: Condvar,
    watch: watch::Sender<Tid>,
}

impl CommitSignal {
    pub fn new(last: Tid) -> CommitSignal {
        CommitSignal {
            last: Mutex::new(last),
            cv: Condvar::new(),
            watch: watch::Sender::new(last),
        }
    }

    /// Records that `tid` is published and wakes every waiter.
    pub fn publish(&self, tid: Tid) {
        let mut last = self.last.lock();
        if tid > *last {
            *last = tid;
            self.watch.send_replace(tid);
        }
        self.cv.notify_all();
    }

    /// Wakes blocking waiters without a new transaction (so they check for shutdown).
    pub fn poke(&self) {
        let _g = self.last.lock();
        self.cv.notify_all();
    }

    pub fn last(&self) -> Tid {
        *self.last.lock()
    }

    /// Blocks until a transaction after `after` is published, or `timeout` passes, or
    /// [`poke`](Self::poke) is called; returns the last published tid.
    pub fn wait_blocking(&self, after: Tid, timeout: Duration) -> Tid {
        let mut last = self.last.lock();
        if *last <= after {
            self.cv.wait_for(&mut last, timeout);
        }
        *last
    }

    /// Waits until a transaction at or after `tid` is published.
    pub async fn wait_for(&self, tid: Tid) {
        let mut rx = self.watch.subscribe();
        let _ = rx.wait_for(|t| *t >= tid).await;
    }
}
