//! Tests of the persistent cache. The crash and open-time tests are in submodules.

mod bench;
mod crash;

use super::*;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn config(dir: &Path, max_bytes: u64) -> CacheConfig {
    CacheConfig::new(dir, max_bytes)
}

/// Deterministic content of revision `tid` of `oid`, `len` bytes.
fn data(oid: u64, tid: u64, len: usize) -> Bytes {
    let mut x = oid.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tid.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

fn rev(oid: u64, start: u64, end: Option<u64>) -> CachedRevision {
    CachedRevision {
        data: data(oid, start, 100),
        start: Tid(start),
        end: end.map(Tid),
    }
}

/// Bytes of the segment files, as the file system sees them.
fn segment_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join(SEGMENTS_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// A cache at last tid 10 holding current revision 5 of oid 1.
fn cache_with_one(dir: &Path) -> Cache {
    let cache = Cache::open(config(dir, 64 * MIB)).unwrap();
    cache.invalidate_many(Tid(10), &[]);
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(10));
    cache
}

#[test]
fn new_cache_is_empty_and_knows_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.last_tid(), Tid::ZERO);
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    assert_eq!(
        cache.invalidations_since(Tid::ZERO),
        Some((Tid::ZERO, vec![]))
    );
    assert!(cache.recent_transactions(10).is_empty());
    assert_eq!(cache.stats().misses, 1);
}

#[test]
fn a_new_cache_refuses_current_answers_until_it_knows_its_position() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(10));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    // Facts about old revisions are fine.
    cache.store(Oid(1), Tid(3), Some(Tid(5)), data(1, 3, 100), Tid(10));
    assert!(cache.load_serial(Oid(1), Tid(3)).is_some());
    cache.invalidate_many(Tid(10), &[]);
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(9));
    assert_eq!(
        cache.load_before(Oid(1), Tid::MAX),
        None,
        "seen before the first position"
    );
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(10));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
}

#[test]
fn current_revision_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
    assert_eq!(cache.load_before(Oid(1), Tid(6)), Some(rev(1, 5, None)));
    assert_eq!(
        cache.load_before(Oid(1), Tid(5)),
        None,
        "start < before is required"
    );
    assert_eq!(cache.load_serial(Oid(1), Tid(5)), Some(data(1, 5, 100)));
    assert_eq!(cache.load_serial(Oid(1), Tid(4)), None);
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), None);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.stores, s.entries), (3, 3, 1, 1));
    assert_eq!(s.bytes, segment_bytes(dir.path()));
}

#[test]
fn noncurrent_interval_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.store(Oid(2), Tid(5), Some(Tid(8)), data(2, 5, 100), Tid(10));
    cache.store(Oid(2), Tid(8), Some(Tid(9)), data(2, 8, 100), Tid(10));
    let r5 = CachedRevision {
        data: data(2, 5, 100),
        start: Tid(5),
        end: Some(Tid(8)),
    };
    let r8 = CachedRevision {
        data: data(2, 8, 100),
        start: Tid(8),
        end: Some(Tid(9)),
    };
    assert_eq!(cache.load_before(Oid(2), Tid(5)), None);
    assert_eq!(cache.load_before(Oid(2), Tid(6)), Some(r5.clone()));
    assert_eq!(
        cache.load_before(Oid(2), Tid(8)),
        Some(r5),
        "before == end still hits"
    );
    assert_eq!(cache.load_before(Oid(2), Tid(9)), Some(r8));
    assert_eq!(
        cache.load_before(Oid(2), Tid(10)),
        None,
        "past the known end"
    );
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), None);
    assert_eq!(cache.load_serial(Oid(2), Tid(8)), Some(data(2, 8, 100)));
    // A later, longer end for the same revision extends it without rewriting the data.
    let bytes = cache.stats().bytes;
    cache.store(Oid(2), Tid(8), Some(Tid(12)), data(2, 8, 100), Tid(10));
    assert_eq!(cache.stats().bytes, bytes);
    assert_eq!(
        cache.load_before(Oid(2), Tid(12)).map(|r| r.end),
        Some(Some(Tid(12)))
    );
    // An empty interval is nonsense and ignored.
    cache.store(Oid(3), Tid(8), Some(Tid(8)), data(3, 8, 100), Tid(10));
    assert_eq!(cache.load_serial(Oid(3), Tid(8)), None);
}

#[test]
fn invalidate_keeps_the_old_revision_as_noncurrent() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.invalidate(Tid(12), &[Oid(1), Oid(7)]);
    assert_eq!(cache.last_tid(), Tid(12));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    assert_eq!(cache.load_before(Oid(1), Tid(13)), None);
    assert_eq!(
        cache.load_before(Oid(1), Tid(12)),
        Some(rev(1, 5, Some(12)))
    );
    assert_eq!(cache.load_before(Oid(1), Tid(6)), Some(rev(1, 5, Some(12))));
    // The new revision arrives; both are served for their snapshots.
    cache.store(Oid(1), Tid(12), None, data(1, 12, 100), Tid(12));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 12, None)));
    assert_eq!(
        cache.load_before(Oid(1), Tid(12)),
        Some(rev(1, 5, Some(12)))
    );
    // Out-of-order or repeated transactions are ignored.
    cache.invalidate(Tid(12), &[Oid(1)]);
    cache.invalidate(Tid(11), &[Oid(1)]);
    assert_eq!(cache.last_tid(), Tid(12));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 12, None)));
}

#[test]
fn entries_newer_than_the_invalidation_stay_current() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    // An answer that had already seen tid 20 (not yet applied here) says revision 20 is current.
    cache.store(Oid(2), Tid(20), None, data(2, 20, 100), Tid(20));
    cache.invalidate(Tid(20), &[Oid(2)]);
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), Some(rev(2, 20, None)));
    cache.invalidate(Tid(21), &[Oid(2)]);
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), None);
    assert_eq!(
        cache.load_before(Oid(2), Tid(21)),
        Some(rev(2, 20, Some(21)))
    );
}

#[test]
fn store_overtaken_by_an_invalidation_is_not_cached_as_current() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.invalidate(Tid(12), &[Oid(2)]);
    // Upstream answered "revision 3 is current" having seen only tid 11: stale by now.
    cache.store(Oid(2), Tid(3), None, data(2, 3, 100), Tid(11));
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), None);
    assert_eq!(cache.load_serial(Oid(2), Tid(3)), None);
    // Other oids are not affected by that invalidation.
    cache.store(Oid(3), Tid(3), None, data(3, 3, 100), Tid(11));
    assert_eq!(cache.load_before(Oid(3), Tid::MAX), Some(rev(3, 3, None)));
    // An answer that saw tid 12 is fine.
    cache.store(Oid(2), Tid(12), None, data(2, 12, 100), Tid(12));
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), Some(rev(2, 12, None)));
    cache.close().unwrap();

    // After a restart the cache cannot check answers older than its last tid.
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    cache.store(Oid(4), Tid(3), None, data(4, 3, 100), Tid(11));
    assert_eq!(cache.load_before(Oid(4), Tid::MAX), None);
    cache.store(Oid(4), Tid(3), None, data(4, 3, 100), Tid(12));
    assert_eq!(cache.load_before(Oid(4), Tid::MAX), Some(rev(4, 3, None)));
}

#[test]
fn the_current_entry_with_the_greater_start_wins() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.store(Oid(1), Tid(3), None, data(1, 3, 100), Tid(10));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
    // A newer current revision (answer ahead of the applied invalidations) replaces it;
    // the older one is kept for the snapshots it is known valid for (up to last_tid + 1).
    cache.store(Oid(1), Tid(14), None, data(1, 14, 100), Tid(15));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 14, None)));
    assert_eq!(
        cache.load_before(Oid(1), Tid(11)),
        Some(rev(1, 5, Some(11)))
    );
    assert_eq!(cache.load_before(Oid(1), Tid(12)), None);
}

#[test]
fn invalidate_many_ends_what_it_can_and_drops_the_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path()); // oid 1: current 5, last tid 10
    cache.store(Oid(2), Tid(12), None, data(2, 12, 100), Tid(13)); // seen ahead of last
    cache.store(Oid(3), Tid(20), None, data(3, 20, 100), Tid(20));
    cache.store(Oid(4), Tid(6), None, data(4, 6, 100), Tid(10)); // not in the summary
    cache.invalidate_many(Tid(15), &[Oid(1), Oid(2), Oid(3)]);
    assert_eq!(cache.last_tid(), Tid(15));
    // Changed somewhere in (10, 15]: valid up to 11 is all that is known.
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    assert_eq!(
        cache.load_before(Oid(1), Tid(11)),
        Some(rev(1, 5, Some(11)))
    );
    assert_eq!(cache.load_before(Oid(1), Tid(12)), None);
    // Revision 12 may or may not have been replaced before 15: dropped.
    assert_eq!(cache.load_serial(Oid(2), Tid(12)), None);
    // Revision 20 is newer than anything in the summary.
    assert_eq!(cache.load_before(Oid(3), Tid::MAX), Some(rev(3, 20, None)));
    assert_eq!(cache.load_before(Oid(4), Tid::MAX), Some(rev(4, 6, None)));
    // Answers from before the summary are refused for its oids.
    cache.store(Oid(1), Tid(13), None, data(1, 13, 100), Tid(14));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    assert_eq!(
        cache.invalidations_since(Tid(10)),
        Some((Tid(15), vec![Oid(1), Oid(2), Oid(3)]))
    );
}

#[test]
fn drop_current_retires_every_current_entry_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.store(Oid(2), Tid(7), Some(Tid(9)), data(2, 7, 100), Tid(10));
    cache.drop_current(Tid(30));
    assert_eq!(cache.last_tid(), Tid(30));
    let check = |cache: &Cache| {
        assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
        assert_eq!(
            cache.load_before(Oid(1), Tid(11)),
            Some(rev(1, 5, Some(11)))
        );
        assert_eq!(cache.load_before(Oid(1), Tid(12)), None);
        assert_eq!(cache.load_serial(Oid(1), Tid(5)), Some(data(1, 5, 100)));
        assert_eq!(cache.load_before(Oid(2), Tid(8)), Some(rev(2, 7, Some(9))));
        assert_eq!(cache.invalidations_since(Tid(10)), None);
        assert_eq!(cache.invalidations_since(Tid(30)), Some((Tid(30), vec![])));
    };
    check(&cache);
    // Answers from before the drop cannot be checked; later ones are current again.
    cache.store(Oid(1), Tid(25), None, data(1, 25, 100), Tid(29));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.last_tid(), Tid(30));
    check(&cache);
    cache.store(Oid(1), Tid(25), None, data(1, 25, 100), Tid(30));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 25, None)));
    // The old generation's entry moved to non-current when the new one replaced it.
    assert_eq!(
        cache.load_before(Oid(1), Tid(11)),
        Some(rev(1, 5, Some(11)))
    );
    cache.invalidate(Tid(31), &[Oid(1)]);
    assert_eq!(
        cache.load_before(Oid(1), Tid(31)),
        Some(rev(1, 25, Some(31)))
    );
    assert_eq!(
        cache.invalidations_since(Tid(30)),
        Some((Tid(31), vec![Oid(1)]))
    );
}

/// The warm-up's position persists (a restart resumes it), `Done` included, and
/// `drop_current`, which retires what was warmed, sets it back to the start.
#[test]
fn the_warm_up_position_survives_reopen_and_drop_current_resets_it() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    assert_eq!(cache.warm_position(), WarmPosition::From(Oid(0)));
    cache.set_warm_position(WarmPosition::From(Oid(300)));
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.warm_position(), WarmPosition::From(Oid(300)));
    cache.set_warm_position(WarmPosition::Done);
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.warm_position(), WarmPosition::Done);
    cache.drop_current(Tid(20));
    assert_eq!(cache.warm_position(), WarmPosition::From(Oid(0)));
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.warm_position(), WarmPosition::From(Oid(0)));
}

/// After a pack with floor 20: history starting by then is gone, current revisions
/// starting by then are suspect (not served until confirmed, dropped when forgotten),
/// later ones are untouched; and all of it holds across a reopen.
#[test]
fn a_pack_drops_old_history_and_makes_old_current_revisions_suspect() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    cache.invalidate_many(Tid(10), &[]);
    // oid 1: current since 5 (kept by the pack, confirmed below).
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(10));
    // oid 2: current since 6 (garbage-collected by the pack, forgotten below).
    cache.store(Oid(2), Tid(6), None, data(2, 6, 100), Tid(10));
    // oid 3: history [7, 15) and [15, 25), current since 25.
    cache.store(Oid(3), Tid(7), Some(Tid(15)), data(3, 7, 100), Tid(10));
    cache.invalidate(Tid(30), &[]);
    cache.store(Oid(3), Tid(15), Some(Tid(25)), data(3, 15, 100), Tid(30));
    cache.store(Oid(3), Tid(25), None, data(3, 25, 100), Tid(30));
    // oid 4: a retired generation's entry (drop_current), start 8, valid up to 31.
    cache.store(Oid(4), Tid(8), None, data(4, 8, 100), Tid(30));
    cache.drop_current(Tid(40));
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(40));
    cache.store(Oid(2), Tid(6), None, data(2, 6, 100), Tid(40));
    cache.store(Oid(3), Tid(25), None, data(3, 25, 100), Tid(40));
    assert_eq!(cache.load_before(Oid(4), Tid(9)), Some(rev(4, 8, Some(31))));

    cache.packed(Tid(20));
    let check = |cache: &Cache| {
        assert_eq!(cache.pack_floor(), Tid(20));
        // Suspect: neither served nor counted as current, but offered for verification.
        for (oid, start) in [(1, 5), (2, 6)] {
            assert_eq!(cache.load_before(Oid(oid), Tid::MAX), None);
            assert!(!cache.has_current(Oid(oid)));
            assert_eq!(cache.load_serial(Oid(oid), Tid(start)), None);
            assert_eq!(
                cache.load_suspect(Oid(oid), Tid::MAX),
                Some(rev(oid, start, None))
            );
        }
        // History starting by the floor is gone; the revision after it is not suspect.
        assert_eq!(cache.load_before(Oid(3), Tid(10)), None);
        assert_eq!(cache.load_before(Oid(3), Tid(20)), None);
        assert_eq!(cache.load_serial(Oid(3), Tid(15)), None);
        assert_eq!(cache.load_before(Oid(3), Tid::MAX), Some(rev(3, 25, None)));
        assert_eq!(cache.load_suspect(Oid(3), Tid::MAX), None);
        // The retired entry started by the floor: dead.
        assert_eq!(cache.load_before(Oid(4), Tid(9)), None);
        assert_eq!(cache.load_serial(Oid(4), Tid(8)), None);
    };
    check(&cache);
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    check(&cache);

    cache.confirm(Oid(1), Tid(5));
    cache.forget(Oid(2), Tid(6));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
    assert_eq!(cache.load_suspect(Oid(1), Tid::MAX), None);
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), None);
    assert_eq!(cache.load_suspect(Oid(2), Tid::MAX), None);
    // A confirmed entry is current again: invalidations end it as usual.
    cache.invalidate(Tid(41), &[Oid(1), Oid(3)]);
    assert_eq!(
        cache.load_before(Oid(1), Tid(41)),
        Some(rev(1, 5, Some(41)))
    );
    assert_eq!(
        cache.load_before(Oid(3), Tid(41)),
        Some(rev(3, 25, Some(41)))
    );
    // History re-fetched after the pack is cached again.
    cache.store(Oid(3), Tid(15), Some(Tid(25)), data(3, 15, 100), Tid(41));
    assert_eq!(
        cache.load_before(Oid(3), Tid(20)),
        Some(rev(3, 15, Some(25)))
    );
    // A later drop_current retires the suspect generation too.
    cache.store(Oid(5), Tid(9), None, data(5, 9, 100), Tid(41));
    cache.packed(Tid(30));
    cache.drop_current(Tid(50));
    assert_eq!(cache.load_suspect(Oid(5), Tid::MAX), None);
    assert_eq!(cache.load_before(Oid(5), Tid::MAX), None);
}

#[test]
fn invalidation_log_is_bounded_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 64 * MIB);
    cfg.invalidation_log_size = 5;
    let cache = Cache::open(cfg.clone()).unwrap();
    cache.drop_current(Tid(1));
    for t in 2..=9u64 {
        cache.invalidate(Tid(t), &[Oid(t), Oid(100)]);
    }
    // Entries 5..=9 remain. As in ZEO, the log answers from its oldest tid on: entry 5
    // might summarise changes since some unknown earlier tid.
    let check = |cache: &Cache| {
        assert_eq!(cache.invalidations_since(Tid(4)), None);
        assert_eq!(
            cache.invalidations_since(Tid(6)),
            Some((Tid(9), vec![Oid(7), Oid(8), Oid(9), Oid(100)]))
        );
        assert_eq!(cache.invalidations_since(Tid(9)), Some((Tid(9), vec![])));
        assert_eq!(cache.invalidations_since(Tid(50)), Some((Tid(9), vec![])));
        assert_eq!(
            cache.recent_transactions(2),
            vec![
                (Tid(8), vec![Oid(8), Oid(100)]),
                (Tid(9), vec![Oid(9), Oid(100)])
            ]
        );
    };
    check(&cache);
    assert_eq!(
        cache.invalidations_since(Tid(5)),
        Some((Tid(9), vec![Oid(6), Oid(7), Oid(8), Oid(9), Oid(100)]))
    );
    assert_eq!(cache.recent_transactions(100).len(), 5);
    cache.close().unwrap();
    let cache = Cache::open(cfg.clone()).unwrap();
    check(&cache);
    cache.close().unwrap();
    // A smaller configured log is trimmed at open.
    cfg.invalidation_log_size = 3;
    let cache = Cache::open(cfg).unwrap();
    assert_eq!(cache.invalidations_since(Tid(6)), None);
    assert_eq!(
        cache.invalidations_since(Tid(7)),
        Some((Tid(9), vec![Oid(8), Oid(9), Oid(100)]))
    );
    assert_eq!(cache.recent_transactions(10).len(), 3);
}

#[test]
fn eviction_bounds_the_disk_and_gives_read_entries_a_second_chance() {
    let dir = tempfile::tempdir().unwrap();
    let max = 4 * MIB;
    let cache = Cache::open(config(dir.path(), max)).unwrap();
    cache.drop_current(Tid(1));
    let len = 8 * 1024;
    cache.store(Oid(1), Tid(1), None, data(1, 1, len), Tid(1)); // hot
    cache.store(Oid(2), Tid(1), None, data(2, 1, len), Tid(1)); // cold
    for i in 0..2000u64 {
        let oid = 10 + i;
        cache.store(Oid(oid), Tid(1), None, data(oid, 1, len), Tid(1));
        if i % 20 == 0 {
            assert!(
                cache.load_before(Oid(1), Tid::MAX).is_some(),
                "hot entry lost at {i}"
            );
        }
        let on_disk = segment_bytes(dir.path());
        assert!(on_disk <= max, "{on_disk} bytes on disk after {i} stores");
    }
    let stats = cache.stats();
    assert_eq!(stats.bytes, segment_bytes(dir.path()));
    assert!(stats.evictions > 1000, "{stats:?}");
    assert!(stats.entries < 600, "{stats:?}");
    assert_eq!(
        cache.load_before(Oid(1), Tid::MAX).map(|r| r.data),
        Some(data(1, 1, len))
    );
    assert_eq!(
        cache.load_before(Oid(2), Tid::MAX),
        None,
        "cold entry survived"
    );
    assert_eq!(
        cache.load_before(Oid(2009), Tid::MAX).map(|r| r.data),
        Some(data(2009, 1, len))
    );
    // Survives a reopen, in a still-bounded cache.
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), max)).unwrap();
    assert_eq!(
        cache.load_before(Oid(1), Tid::MAX).map(|r| r.data),
        Some(data(1, 1, len))
    );
    assert!(segment_bytes(dir.path()) <= max);
}

#[test]
fn shrinking_the_configured_size_evicts_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    cache.drop_current(Tid(1));
    for oid in 0..1000u64 {
        cache.store(Oid(oid), Tid(1), None, data(oid, 1, 8000), Tid(1));
    }
    cache.close().unwrap();
    assert!(segment_bytes(dir.path()) > 7 * MIB);
    let cache = Cache::open(config(dir.path(), 4 * MIB)).unwrap();
    assert!(segment_bytes(dir.path()) <= 4 * MIB);
    assert!(cache.stats().entries < 1000);
    assert_eq!(
        cache.load_before(Oid(999), Tid::MAX).map(|r| r.data),
        Some(data(999, 1, 8000))
    );
}

#[test]
fn too_big_records_are_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path(), 4 * MIB)).unwrap();
    cache.drop_current(Tid(1));
    cache.store(Oid(1), Tid(1), None, data(1, 1, (MIB + 1) as usize), Tid(1));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    cache.store(Oid(1), Tid(1), None, data(1, 1, 500_000), Tid(1));
    assert!(cache.load_before(Oid(1), Tid::MAX).is_some());
}

/// Offset of `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern in segment")
}

#[test]
fn a_corrupt_record_is_a_miss_and_its_entry_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.store(Oid(2), Tid(5), None, data(2, 5, 100), Tid(10));
    cache.close().unwrap();
    let [seg] = segment_files(dir.path()).try_into().unwrap();
    let mut bytes = fs::read(&seg).unwrap();
    let at = find(&bytes, &data(1, 5, 100)) + 50;
    bytes[at] ^= 1;
    fs::write(&seg, &bytes).unwrap();

    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.stats().entries, 2);
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    assert_eq!(cache.stats().entries, 1, "bad entry dropped");
    assert_eq!(cache.load_serial(Oid(1), Tid(5)), None);
    assert_eq!(cache.load_before(Oid(2), Tid::MAX), Some(rev(2, 5, None)));
    // The oid can be cached again.
    cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(10));
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
}

#[test]
fn a_truncated_segment_loses_only_the_records_past_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    for oid in 2..=10u64 {
        cache.store(Oid(oid), Tid(5), None, data(oid, 5, 100), Tid(10));
    }
    cache.close().unwrap();
    let [seg] = segment_files(dir.path()).try_into().unwrap();
    let bytes = fs::read(&seg).unwrap();
    // Cut in the middle of oid 6's record.
    let cut = find(&bytes, &data(6, 5, 100)) + 10;
    fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(cut as u64)
        .unwrap();

    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    for oid in 1..=5u64 {
        assert_eq!(
            cache.load_before(Oid(oid), Tid::MAX),
            Some(rev(oid, 5, None)),
            "oid {oid}"
        );
    }
    for oid in 6..=10u64 {
        assert_eq!(cache.load_before(Oid(oid), Tid::MAX), None, "oid {oid}");
    }
    assert_eq!(cache.stats().entries, 5);
    // New data goes to a new segment, not over the damaged one's tail.
    cache.store(Oid(6), Tid(5), None, data(6, 5, 100), Tid(10));
    assert_eq!(cache.load_before(Oid(6), Tid::MAX), Some(rev(6, 5, None)));
}

#[test]
fn a_deleted_index_opens_empty_and_removes_the_orphaned_segments() {
    let dir = tempfile::tempdir().unwrap();
    cache_with_one(dir.path()).close().unwrap();
    assert_eq!(segment_files(dir.path()).len(), 1);
    fs::remove_file(dir.path().join(INDEX_FILE)).unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.last_tid(), Tid::ZERO);
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), None);
    assert!(segment_files(dir.path()).is_empty());
}

#[test]
fn a_corrupt_index_is_set_aside() {
    for damage in ["garbage", "truncated", "zeroed header"] {
        let dir = tempfile::tempdir().unwrap();
        cache_with_one(dir.path()).close().unwrap();
        let index = dir.path().join(INDEX_FILE);
        let mut bytes = fs::read(&index).unwrap();
        match damage {
            "garbage" => bytes = b"this is not a redb file".repeat(1000),
            "truncated" => bytes.truncate(bytes.len() / 3),
            _ => bytes[..4096].fill(0),
        }
        fs::write(&index, &bytes).unwrap();
        let cache =
            Cache::open(config(dir.path(), 64 * MIB)).unwrap_or_else(|e| panic!("{damage}: {e}"));
        assert_eq!(cache.last_tid(), Tid::ZERO, "{damage}");
        assert_eq!(cache.load_before(Oid(1), Tid::MAX), None, "{damage}");
        assert!(dir.path().join(BAD_INDEX_FILE).exists(), "{damage}");
        assert!(segment_files(dir.path()).is_empty(), "{damage}");
        // And it works.
        cache.invalidate_many(Tid(10), &[]);
        cache.store(Oid(1), Tid(5), None, data(1, 5, 100), Tid(10));
        assert_eq!(
            cache.load_before(Oid(1), Tid::MAX),
            Some(rev(1, 5, None)),
            "{damage}"
        );
    }
}

#[test]
fn a_second_open_of_the_same_directory_fails_without_harming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let cache = cache_with_one(dir.path());
    cache.flush().unwrap();
    assert!(Cache::open(config(dir.path(), 64 * MIB)).is_err());
    assert!(!dir.path().join(BAD_INDEX_FILE).exists());
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
    cache.close().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.load_before(Oid(1), Tid::MAX), Some(rev(1, 5, None)));
}

#[test]
fn a_clean_reopen_continues_the_last_segment() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..5u64 {
        let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
        cache.invalidate(Tid(10 + round), &[]);
        cache.store(
            Oid(round),
            Tid(5),
            None,
            data(round, 5, 100),
            Tid(10 + round),
        );
        cache.close().unwrap();
    }
    assert_eq!(segment_files(dir.path()).len(), 1);
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    for round in 0..5u64 {
        assert_eq!(
            cache.load_before(Oid(round), Tid::MAX),
            Some(rev(round, 5, None))
        );
    }
    // Dropping without close flushes but records no clean end: the next open starts a
    // new segment rather than trust the old one's tail.
    cache.store(Oid(9), Tid(5), None, data(9, 5, 100), Tid(14));
    drop(cache);
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    assert_eq!(cache.load_before(Oid(9), Tid::MAX), Some(rev(9, 5, None)));
    cache.store(Oid(10), Tid(5), None, data(10, 5, 100), Tid(14));
    assert_eq!(segment_files(dir.path()).len(), 2);
}

#[test]
fn reopening_a_few_megabytes_is_quick() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    cache.drop_current(Tid(1));
    for oid in 0..2000u64 {
        cache.store(Oid(oid), Tid(1), None, data(oid, 1, 2000), Tid(1));
        if oid % 10 == 0 {
            cache.invalidate(Tid(2 + oid), &[Oid(oid)]);
        }
    }
    cache.close().unwrap();
    let started = Instant::now();
    let cache = Cache::open(config(dir.path(), 64 * MIB)).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(2), "open took {elapsed:?}");
    assert_eq!(cache.stats().entries, 2000);
    assert_eq!(
        cache.load_before(Oid(1999), Tid::MAX).map(|r| r.data),
        Some(data(1999, 1, 2000))
    );
}

#[test]
fn concurrent_readers_see_only_correct_revisions() {
    let dir = tempfile::tempdir().unwrap();
    // Small enough that the writer evicts (and copies forward what readers touched).
    let cache = Arc::new(Cache::open(config(dir.path(), 2 * MIB)).unwrap());
    cache.drop_current(Tid(1));
    let oids = 200u64;
    // Revision of oid at tid t: t for every oid touched by transaction t (t % oids == oid).
    let writer = {
        let cache = cache.clone();
        std::thread::spawn(move || {
            for t in 2..3000u64 {
                let oid = t % oids;
                cache.invalidate(Tid(t), &[Oid(oid)]);
                cache.store(Oid(oid), Tid(t), None, data(oid, t, 1000), Tid(t));
            }
        })
    };
    let readers: Vec<_> = (0..3)
        .map(|r| {
            let cache = cache.clone();
            std::thread::spawn(move || {
                let mut hits = 0;
                for i in 0..20_000u64 {
                    let oid = (i * 7 + r) % oids;
                    if let Some(rev) = cache.load_before(Oid(oid), Tid::MAX) {
                        assert_eq!(rev.start.0 % oids, oid);
                        assert_eq!(rev.data, data(oid, rev.start.0, 1000));
                        hits += 1;
                    }
                }
                hits
            })
        })
        .collect();
    writer.join().unwrap();
    let hits: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(hits > 0);
    assert!(cache.stats().evictions > 0);
    assert!(segment_bytes(dir.path()) <= 2 * MIB);
    // Every oid's current revision is its last write.
    for oid in 0..oids {
        let last = (2..3000u64).filter(|t| t % oids == oid).max().unwrap();
        let rev = cache.load_before(Oid(oid), Tid::MAX);
        assert!(
            rev.is_none() || rev.as_ref().map(|r| r.start) == Some(Tid(last)),
            "oid {oid}: {rev:?}"
        );
    }
}

#[test]
fn cache_is_send_and_sync() {
    fn is<T: Send + Sync>() {}
    is::<Cache>();
}

/// `index_memory` sizes the window of recent invalidations: an answer "current as of
/// `seen`" older than the window cannot be checked and is not cached, with the smallest
/// setting, while the default window still covers it.
#[test]
fn index_memory_sizes_the_window_of_recent_invalidations() {
    let small = CacheConfig {
        index_memory: Some(0),
        ..config(Path::new("unused"), 64 * MIB)
    };
    assert_eq!(small.effective_index_memory(), MIN_INDEX_MEMORY);
    let window = MIN_INDEX_MEMORY / INDEX_MEMORY_PER_RECENT_OID;
    assert_eq!(
        config(Path::new("unused"), 64 * MIB).effective_index_memory(),
        16 * MIB
    );
    assert_eq!(
        config(Path::new("unused"), 64 << 30).effective_index_memory(),
        256 * MIB
    );
    for (index_memory, cached) in [(Some(0), false), (None, true)] {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(CacheConfig {
            index_memory,
            ..config(dir.path(), 64 * MIB)
        })
        .unwrap();
        cache.drop_current(Tid(1));
        // Twice the small window of other oids' invalidations after tid 2.
        for t in 0..2 * window {
            cache.invalidate(Tid(3 + t), &[Oid(1000 + t)]);
        }
        // An answer for oid 1 that upstream gave as current at tid 2.
        cache.store(Oid(1), Tid(2), None, data(1, 2, 100), Tid(2));
        assert_eq!(
            cache.load_before(Oid(1), Tid::MAX).is_some(),
            cached,
            "index_memory {index_memory:?}"
        );
    }
}
