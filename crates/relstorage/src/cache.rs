//! A bounded in-memory cache of current object states, kept correct by the commit stream.
//!
//! Invariants:
//! - `visible` is the last transaction announced to the server's invalidation sink; loads
//!   never see past it (see `storage`), so a reply can never reach a client before the
//!   invalidation of the transaction that produced it.
//! - An entry `oid → (tid, data)` is the revision of `oid` current as of `visible`.
//!   [`Cache::announce`] removes the oids of a transaction *and* moves `visible` under one
//!   lock, so a reader never pairs a new `visible` with a stale entry.
//! - A load that missed and read the database at an older `visible` may only insert its
//!   result if no transaction announced since then touched the oid: the last
//!   [`RECENT`] announcements are kept to check that, and when they do not reach back far
//!   enough the result is simply not cached.
//! - Memory is bounded by `max_bytes` (data plus a fixed overhead per entry); eviction is
//!   first-in, first-out.
//! - A current entry dropped by an announcement is kept a while longer as a *previous*
//!   revision with its validity interval `[start, end)` (end = the announcing tid), in a
//!   second FIFO bounded by a quarter of `max_bytes`. It answers `loadSerial` and
//!   `loadBefore` for recently replaced states, which a history-free database no longer
//!   has: what ZEO clients need to resolve a conflict on a hot object, or to finish
//!   reading a snapshot while others commit.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use zodb::{Oid, Tid};

/// How many recent announcements are remembered for the insert check.
const RECENT: usize = 512;
/// Bookkeeping per entry, counted against the bound.
const ENTRY_OVERHEAD: usize = 64;

pub struct Cache {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

struct Inner {
    visible: Tid,
    map: HashMap<Oid, (Tid, Bytes, u64)>,
    /// Insertion order with the generation of each insertion (stale ones are skipped).
    order: VecDeque<(Oid, u64)>,
    next_gen: u64,
    bytes: usize,
    recent: VecDeque<(Tid, HashSet<Oid>)>,
    /// Set once `recent` has dropped an announcement.
    overflowed: bool,
    /// Bumped by [`Cache::clear`]: results read before it are never inserted.
    epoch: u64,
    /// Replaced revisions: oid → (start, end, data), oldest first.
    previous: HashMap<Oid, VecDeque<(Tid, Tid, Bytes)>>,
    previous_order: VecDeque<(Oid, Tid)>,
    previous_bytes: usize,
    hits: u64,
    misses: u64,
}

/// The cache's state when a load started: what it may insert afterwards depends on it.
#[derive(Debug, Clone, Copy)]
pub struct Seen {
    /// The last announced transaction, the newest a load may see.
    pub visible: Tid,
    epoch: u64,
}

/// What a cache lookup found.
pub enum Lookup {
    /// The current revision (as of `visible`).
    Hit { tid: Tid, data: Bytes },
    /// Not cached (or the cached revision is too new for the request).
    Miss,
}

impl Cache {
    pub fn new(max_bytes: usize, visible: Tid) -> Cache {
        Cache {
            inner: Mutex::new(Inner {
                visible,
                map: HashMap::new(),
                order: VecDeque::new(),
                next_gen: 0,
                bytes: 0,
                recent: VecDeque::new(),
                overflowed: false,
                epoch: 0,
                previous: HashMap::new(),
                previous_order: VecDeque::new(),
                previous_bytes: 0,
                hits: 0,
                misses: 0,
            }),
            max_bytes,
        }
    }

    pub fn visible(&self) -> Tid {
        self.inner.lock().visible
    }

    /// The cached current revision of `oid` if it is older than `before`, with the
    /// state of the cache it was looked up in.
    pub fn lookup(&self, oid: Oid, before: Tid) -> (Lookup, Seen) {
        let mut g = self.inner.lock();
        let v = Seen {
            visible: g.visible,
            epoch: g.epoch,
        };
        let found = match g.map.get(&oid) {
            Some((tid, data, _)) if *tid < before => Lookup::Hit {
                tid: *tid,
                data: data.clone(),
            },
            _ => Lookup::Miss,
        };
        match found {
            Lookup::Hit { .. } => g.hits += 1,
            Lookup::Miss => g.misses += 1,
        }
        (found, v)
    }

    /// Caches `oid`'s current revision as read from the database while `visible` was
    /// `seen`, unless a transaction announced since then changed it.
    pub fn insert(&self, oid: Oid, tid: Tid, data: Bytes, seen: Seen) {
        let size = data.len() + ENTRY_OVERHEAD;
        if size > self.max_bytes / 8 {
            return;
        }
        let mut g = self.inner.lock();
        if g.epoch != seen.epoch {
            return;
        }
        if g.visible != seen.visible {
            // Every announcement after `seen` must still be in `recent` to tell.
            let complete =
                !g.overflowed || g.recent.front().is_some_and(|(t, _)| *t <= seen.visible);
            if !complete
                || g.recent
                    .iter()
                    .any(|(t, oids)| *t > seen.visible && oids.contains(&oid))
            {
                return;
            }
        }
        if tid > g.visible {
            return;
        }
        let gen = g.next_gen;
        g.next_gen += 1;
        if let Some((_, old, _)) = g.map.insert(oid, (tid, data, gen)) {
            g.bytes -= old.len() + ENTRY_OVERHEAD;
        }
        g.bytes += size;
        g.order.push_back((oid, gen));
        while g.bytes > self.max_bytes {
            let Some((o, gen)) = g.order.pop_front() else {
                break;
            };
            if g.map.get(&o).is_some_and(|e| e.2 == gen) {
                let (_, d, _) = g.map.remove(&o).expect("present");
                g.bytes -= d.len() + ENTRY_OVERHEAD;
            }
        }
        // Keep the order queue from growing with stale generations.
        if g.order.len() > 2 * g.map.len() + 1024 {
            let Inner { order, map, .. } = &mut *g;
            order.retain(|(o, gen)| map.get(o).is_some_and(|e| e.2 == *gen));
        }
    }

    /// Transaction `tid` changed `oids`: drop them (keeping them as previous revisions)
    /// and make `tid` visible.
    pub fn announce(&self, tid: Tid, oids: &[Oid]) {
        let mut g = self.inner.lock();
        let previous_max = self.max_bytes / 4;
        for oid in oids {
            if let Some((start, d, _)) = g.map.remove(oid) {
                g.bytes -= d.len() + ENTRY_OVERHEAD;
                if start < tid {
                    g.previous_bytes += d.len() + ENTRY_OVERHEAD;
                    g.previous
                        .entry(*oid)
                        .or_default()
                        .push_back((start, tid, d));
                    g.previous_order.push_back((*oid, start));
                }
            }
        }
        while g.previous_bytes > previous_max {
            let Some((oid, start)) = g.previous_order.pop_front() else {
                break;
            };
            let Inner {
                previous,
                previous_bytes,
                ..
            } = &mut *g;
            if let Some(list) = previous.get_mut(&oid) {
                if let Some(i) = list.iter().position(|(s, _, _)| *s == start) {
                    let (_, _, d) = list.remove(i).expect("found");
                    *previous_bytes -= d.len() + ENTRY_OVERHEAD;
                }
                if list.is_empty() {
                    previous.remove(&oid);
                }
            }
        }
        if g.recent.len() == RECENT {
            g.recent.pop_front();
            g.overflowed = true;
        }
        g.recent.push_back((tid, oids.iter().copied().collect()));
        if tid > g.visible {
            g.visible = tid;
        }
    }

    /// A replaced revision of `oid` valid just before `before`: (start, end, data).
    pub fn previous_before(&self, oid: Oid, before: Tid) -> Option<(Tid, Tid, Bytes)> {
        let g = self.inner.lock();
        g.previous
            .get(&oid)?
            .iter()
            .find(|(s, e, _)| *s < before && before <= *e)
            .cloned()
    }

    /// The data of revision `serial` of `oid`, if it is in memory.
    pub fn serial(&self, oid: Oid, serial: Tid) -> Option<Bytes> {
        let g = self.inner.lock();
        if let Some((t, d, _)) = g.map.get(&oid) {
            if *t == serial {
                return Some(d.clone());
            }
        }
        g.previous
            .get(&oid)?
            .iter()
            .find(|(s, _, _)| *s == serial)
            .map(|(_, _, d)| d.clone())
    }

    /// The cache's state as of the announcement of `tid` (for caching what a local
    /// commit wrote, right after announcing it).
    pub fn seen_at(&self, tid: Tid) -> Seen {
        Seen {
            visible: tid,
            epoch: self.inner.lock().epoch,
        }
    }

    /// Forgets everything (after a pack, whose removals are not announced).
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        g.map.clear();
        g.order.clear();
        g.bytes = 0;
        g.previous.clear();
        g.previous_order.clear();
        g.previous_bytes = 0;
        // Results read before the clear must not be inserted afterwards.
        g.epoch += 1;
    }

    /// (hits, misses, entries, bytes)
    pub fn stats(&self) -> (u64, u64, usize, usize) {
        let g = self.inner.lock();
        (g.hits, g.misses, g.map.len(), g.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_drops_entries_and_blocks_stale_inserts() {
        let c = Cache::new(1 << 20, Tid(10));
        let seen = c.lookup(Oid(9), Tid::MAX).1;
        c.insert(Oid(1), Tid(5), Bytes::from_static(b"a"), seen);
        assert!(matches!(c.lookup(Oid(1), Tid(11)).0, Lookup::Hit { .. }));
        // Too new for a read before tid 5.
        assert!(matches!(c.lookup(Oid(1), Tid(5)).0, Lookup::Miss));
        c.announce(Tid(12), &[Oid(1)]);
        assert!(matches!(c.lookup(Oid(1), Tid(20)).0, Lookup::Miss));
        // Kept as the previous revision [5, 12).
        assert_eq!(c.serial(Oid(1), Tid(5)).as_deref(), Some(&b"a"[..]));
        assert_eq!(
            c.previous_before(Oid(1), Tid(12)).map(|(s, e, _)| (s, e)),
            Some((Tid(5), Tid(12)))
        );
        assert!(c.previous_before(Oid(1), Tid(13)).is_none());
        assert!(c.previous_before(Oid(1), Tid(5)).is_none());
        // A result read at visible=10 for oid 1 is stale now: not inserted.
        c.insert(Oid(1), Tid(5), Bytes::from_static(b"a"), seen);
        assert!(matches!(c.lookup(Oid(1), Tid(20)).0, Lookup::Miss));
        // Oid 2 was not touched by tid 12: a result read at 10 is still current.
        c.insert(Oid(2), Tid(7), Bytes::from_static(b"b"), seen);
        assert!(matches!(c.lookup(Oid(2), Tid(20)).0, Lookup::Hit { .. }));
        let before_clear = c.lookup(Oid(9), Tid::MAX).1;
        c.clear();
        c.insert(Oid(3), Tid(7), Bytes::from_static(b"c"), before_clear);
        assert!(matches!(c.lookup(Oid(3), Tid(20)).0, Lookup::Miss));
        let after = c.lookup(Oid(9), Tid::MAX).1;
        c.insert(Oid(3), Tid(7), Bytes::from_static(b"c"), after);
        assert!(matches!(c.lookup(Oid(3), Tid(20)).0, Lookup::Hit { .. }));
    }

    #[test]
    fn bounded_by_bytes() {
        let c = Cache::new(64 * 1024, Tid(1));
        let seen = c.lookup(Oid(0), Tid::MAX).1;
        for i in 0..1000u64 {
            c.insert(Oid(i), Tid(1), Bytes::from(vec![0u8; 1000]), seen);
        }
        let (_, _, n, bytes) = c.stats();
        assert!(bytes <= 64 * 1024, "{bytes}");
        assert!(n > 0 && n < 1000);
    }
}
