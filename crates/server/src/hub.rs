//! The invalidation hub of one storage.
//!
//! Every committed transaction — made by a local session or, in proxy mode, reported by
//! the upstream server — reaches the hub through [`InvalidationSink::invalidate`], and the
//! hub queues an `invalidateTransaction` to every registered session except the
//! committer. One mutex orders it all: registering (reading the last tid and subscribing)
//! and fanning out are atomic with respect to each other, so a client never misses a
//! transaction after the tid `register` gave it and never sees one twice.
//!
//! The hub also keeps the recent-transactions queue that answers `getInvalidations`
//! for reconnecting clients.

use crate::outbox::Outbox;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use zeo_proto::{Callback, Encoding};
use zodb::{InvalidationSink, Oid, Tid, TxnKey};

pub type SessionId = u64;

pub struct Hub {
    inner: Mutex<Inner>,
}

struct Inner {
    last_tid: Tid,
    sessions: HashMap<SessionId, Arc<Outbox>>,
    /// Transactions in the vote–finish window, and the session that made each.
    committers: HashMap<TxnKey, SessionId>,
    /// Recent transactions, oldest first.
    queue: VecDeque<(Tid, Arc<[Oid]>)>,
    queue_size: usize,
    invalidations_sent: u64,
}

impl Hub {
    /// `recent` seeds the queue (oldest first), so a restarted server can still tell
    /// reconnecting clients what changed.
    pub fn new(last_tid: Tid, recent: Vec<(Tid, Vec<Oid>)>, queue_size: usize) -> Hub {
        let mut queue: VecDeque<(Tid, Arc<[Oid]>)> =
            recent.into_iter().map(|(t, o)| (t, Arc::from(o))).collect();
        while queue.len() > queue_size {
            queue.pop_front();
        }
        Hub {
            inner: Mutex::new(Inner {
                last_tid,
                sessions: HashMap::new(),
                committers: HashMap::new(),
                queue,
                queue_size,
                invalidations_sent: 0,
            }),
        }
    }

    /// Subscribes a session and returns the last tid, atomically with respect to commits.
    /// `reply` makes the frame that tells the client that tid; it is queued before any
    /// invalidation can be.
    pub fn register(
        &self,
        id: SessionId,
        outbox: Arc<Outbox>,
        reply: impl FnOnce(Tid) -> Bytes,
    ) -> Tid {
        let mut inner = self.inner.lock();
        outbox.set_registered_tid(inner.last_tid);
        // Queued, not written here: the hub's lock is held.
        outbox.queue(reply(inner.last_tid));
        inner.sessions.insert(id, outbox);
        inner.last_tid
    }

    pub fn unregister(&self, id: SessionId) {
        let mut inner = self.inner.lock();
        inner.sessions.remove(&id);
        inner.committers.retain(|_, s| *s != id);
    }

    /// Notes that `key` is being committed by session `id`, so its invalidation skips it.
    pub fn begin_commit(&self, key: TxnKey, id: SessionId) {
        self.inner.lock().committers.insert(key, id);
    }

    pub fn end_commit(&self, key: TxnKey) {
        self.inner.lock().committers.remove(&key);
    }

    pub fn last_tid(&self) -> Tid {
        self.inner.lock().last_tid
    }

    pub fn connections(&self) -> usize {
        self.inner.lock().sessions.len()
    }

    pub fn invalidations_sent(&self) -> u64 {
        self.inner.lock().invalidations_sent
    }

    /// Answers `getInvalidations(tid)` from the queue: `(latest tid, oids changed after
    /// tid)`, or `None` when the queue does not reach back to `tid`.
    pub fn invalidations_since(&self, tid: Tid) -> Option<(Tid, Vec<Oid>)> {
        let inner = self.inner.lock();
        if tid >= inner.last_tid {
            return Some((inner.last_tid, Vec::new()));
        }
        let oldest = inner.queue.front()?.0;
        if oldest > tid {
            return None;
        }
        let mut oids: Vec<Oid> = inner
            .queue
            .iter()
            .filter(|(t, _)| *t > tid)
            .flat_map(|(_, o)| o.iter().copied())
            .collect();
        oids.sort_unstable();
        oids.dedup();
        Some((inner.last_tid, oids))
    }

    /// Sends a callback to every session (used for `info` after a pack).
    pub fn broadcast(&self, callback: &Callback) {
        let inner = self.inner.lock();
        let mut frames: [Option<Bytes>; 2] = [None, None];
        for out in inner.sessions.values() {
            // Queued, not written here: the hub's lock is held.
            out.queue(encoded(&mut frames, out.encoding, callback));
        }
    }
}

/// Encodes a callback once per encoding and shares the frame among sessions.
fn encoded(cache: &mut [Option<Bytes>; 2], enc: Encoding, callback: &Callback) -> Bytes {
    let slot = &mut cache[match enc {
        Encoding::Pickle => 0,
        Encoding::Msgpack => 1,
    }];
    slot.get_or_insert_with(|| callback.frame(enc)).clone()
}

impl InvalidationSink for Hub {
    fn reset(&self, tid: Tid) {
        let mut inner = self.inner.lock();
        tracing::warn!(%tid, clients = inner.sessions.len(),
                       "storage history lost: disconnecting every client so it revalidates its cache");
        inner.queue.clear();
        if tid > inner.last_tid {
            inner.last_tid = tid;
        }
        for out in inner.sessions.values() {
            out.send_invalidation(tid, None);
            out.close();
        }
    }

    fn invalidate(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>) {
        let mut inner = self.inner.lock();
        if tid <= inner.last_tid && inner.last_tid != Tid::ZERO {
            // Never send a client a tid that does not increase; a storage doing so is a bug.
            tracing::error!(%tid, last = %inner.last_tid, "invalidation out of order ignored");
            return;
        }
        inner.last_tid = tid;
        let skip = committer.and_then(|k| inner.committers.get(&k).copied());
        let callback = Callback::InvalidateTransaction {
            tid,
            oids: oids.to_vec(),
        };
        let mut frames: [Option<Bytes>; 2] = [None, None];
        let mut sent = 0;
        for (id, out) in inner.sessions.iter() {
            if Some(*id) == skip {
                out.own_commit_announced(tid);
                continue;
            }
            let f = encoded(&mut frames, out.encoding, &callback);
            out.send_invalidation(tid, Some(f));
            sent += 1;
        }
        inner.invalidations_sent += sent;
        inner.queue.push_back((tid, Arc::from(oids)));
        while inner.queue.len() > inner.queue_size {
            inner.queue.pop_front();
        }
    }
}
