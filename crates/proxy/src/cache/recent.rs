//! In-memory bookkeeping that need not survive a restart.

use std::collections::{HashMap, HashSet, VecDeque};
use zodb::{Oid, Tid};

use super::segment::Loc;

/// The latest invalidation tid of each oid over a bounded window of recent transactions.
///
/// It decides whether an upstream answer "revision R is current, as of `seen`" may be
/// cached as current: not if an invalidation of that oid with a tid after `seen` has already
/// been applied (the answer was overtaken; caching it would resurrect stale data). When
/// `seen` is older than the window, the answer cannot be checked and is refused.
#[derive(Debug)]
pub(super) struct RecentInvalidations {
    /// Every invalidation with a tid after this one is in `last`.
    covered_from: Tid,
    last: HashMap<Oid, Tid>,
    order: VecDeque<(Tid, Vec<Oid>)>,
    held: usize,
    budget: usize,
}

impl RecentInvalidations {
    /// Knows every invalidation after `from` (none yet), holding at most about `budget` oids.
    pub fn new(from: Tid, budget: usize) -> Self {
        RecentInvalidations {
            covered_from: from,
            last: HashMap::new(),
            order: VecDeque::new(),
            held: 0,
            budget,
        }
    }

    /// Records that `oids` changed in transaction `tid` (tids arrive in increasing order).
    pub fn record(&mut self, tid: Tid, oids: &[Oid]) {
        for &oid in oids {
            self.last.insert(oid, tid);
        }
        self.order.push_back((tid, oids.to_vec()));
        self.held += oids.len();
        // Keep at least the newest transaction, however big.
        while self.held > self.budget && self.order.len() > 1 {
            let Some((old, oids)) = self.order.pop_front() else {
                break;
            };
            for oid in &oids {
                if self.last.get(oid) == Some(&old) {
                    self.last.remove(oid);
                }
            }
            self.held -= oids.len();
            self.covered_from = old;
        }
    }

    /// Forgets everything: nothing is known about what changed up to `tid`.
    pub fn reset(&mut self, tid: Tid) {
        self.last.clear();
        self.order.clear();
        self.held = 0;
        self.covered_from = tid;
    }

    /// Whether an answer saying some revision of `oid` was current as of `seen` is still
    /// known to be current (no later invalidation of `oid` has been applied).
    pub fn may_store_current(&self, oid: Oid, seen: Tid) -> bool {
        seen >= self.covered_from && self.last.get(&oid).is_none_or(|&t| t <= seen)
    }
}

/// Records read since they were written (or last copied forward): the second chance of
/// segment eviction. Bounded: once `cap` records are marked, further reads are not recorded
/// until an eviction consumes marks (a partial second chance rather than unbounded memory).
#[derive(Debug)]
pub(super) struct Accessed {
    by_seg: HashMap<u64, HashSet<u32>>,
    count: usize,
    cap: usize,
}

impl Accessed {
    pub fn new(cap: usize) -> Self {
        Accessed {
            by_seg: HashMap::new(),
            count: 0,
            cap,
        }
    }

    pub fn mark(&mut self, loc: Loc) {
        if self.count >= self.cap {
            return;
        }
        if self.by_seg.entry(loc.seg).or_default().insert(loc.off) {
            self.count += 1;
        }
    }

    /// Removes and returns the marks of segment `seg`.
    pub fn take(&mut self, seg: u64) -> HashSet<u32> {
        let marks = self.by_seg.remove(&seg).unwrap_or_default();
        self.count -= marks.len();
        marks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_answers_overtaken_by_an_invalidation() {
        let mut r = RecentInvalidations::new(Tid(10), 100);
        assert!(r.may_store_current(Oid(1), Tid(10)));
        assert!(
            !r.may_store_current(Oid(1), Tid(9)),
            "seen before the window"
        );
        r.record(Tid(12), &[Oid(1)]);
        assert!(!r.may_store_current(Oid(1), Tid(11)));
        assert!(r.may_store_current(Oid(1), Tid(12)));
        assert!(r.may_store_current(Oid(2), Tid(11)));
    }

    #[test]
    fn window_slides_and_refuses_what_it_forgot() {
        let mut r = RecentInvalidations::new(Tid(0), 2);
        r.record(Tid(1), &[Oid(1)]);
        r.record(Tid(2), &[Oid(2)]);
        r.record(Tid(3), &[Oid(3)]);
        // Tid 1 fell out: answers seen before it cannot be checked any more.
        assert!(!r.may_store_current(Oid(9), Tid(0)));
        assert!(r.may_store_current(Oid(1), Tid(1)));
        assert!(!r.may_store_current(Oid(2), Tid(1)));
        r.reset(Tid(5));
        assert!(!r.may_store_current(Oid(9), Tid(4)));
        assert!(r.may_store_current(Oid(3), Tid(5)));
    }

    #[test]
    fn accessed_marks_are_bounded_and_taken_per_segment() {
        let mut a = Accessed::new(2);
        a.mark(Loc {
            seg: 1,
            off: 16,
            len: 1,
        });
        a.mark(Loc {
            seg: 1,
            off: 16,
            len: 1,
        });
        a.mark(Loc {
            seg: 2,
            off: 16,
            len: 1,
        });
        a.mark(Loc {
            seg: 3,
            off: 16,
            len: 1,
        }); // over the cap: dropped
        assert_eq!(a.take(1).len(), 1);
        assert!(a.take(3).is_empty());
        a.mark(Loc {
            seg: 3,
            off: 99,
            len: 1,
        });
        assert!(a.take(3).contains(&99));
    }
}
