//! Crash safety: the cache is driven through a simulated upstream history (stores of
//! current, stale, ahead-of-time and non-current answers, per-transaction and summary
//! invalidations, generation drops, flushes, reads that trigger copy-forward, evictions),
//! then crashed, reopened and every answer it gives is checked against the history: never
//! a revision that was not current at the cache's `last_tid`, never bytes that are not
//! the revision's, and `last_tid` never behind what a flush made durable.
//!
//! Two kinds of crash, both at points fixed by the seed (no timing involved):
//! - **process crash**: a child process on the real file system aborts itself (no
//!   destructors, no flush: what SIGKILL does) after a number of operations drawn from the
//!   seed; the page cache keeps everything it wrote, so this checks redb's own file
//!   backend and the real files, not durability;
//! - **power loss**: the cache runs on a simulated disk ([`fsio::simfs::SimFs`]) and every
//!   crash image at a sample of points (around every sync, where ordering matters, and in
//!   between) is reopened and checked: unsynced segment writes and redb pages lost or torn,
//!   directory entries of new or evicted segments lost. One image of each round's end is
//!   the disk the next round starts from.

use super::*;
use fsio::forgetful::Forgetful;
use fsio::simfs::{SimFs, Torn};
use fsio::Fs;
use std::process::{Command, Stdio};

const DIR_ENV: &str = "ZEORS_CACHE_CRASH_DIR";
const SEED_ENV: &str = "ZEORS_CACHE_CRASH_SEED";
const STEPS_ENV: &str = "ZEORS_CACHE_CRASH_STEPS";
const OIDS: u64 = 300;
const TXNS: usize = 200_000;
const MAX_BYTES: u64 = 2 * MIB;

/// splitmix64: a small deterministic generator, so child and parent agree on the history.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(1000) < percent * 10
    }
}

/// The simulated upstream: transaction `i` has tid `1000 + 7 i` (gaps, so that the cache's
/// `last_tid + 1` bounds are not real tids) and changes a few oids; transaction 0 creates
/// every oid.
struct History {
    txns: Vec<Vec<Oid>>,
    /// Revisions of each oid, ascending.
    revs: Vec<Vec<Tid>>,
}

fn tid(i: usize) -> Tid {
    Tid(1000 + 7 * i as u64)
}

fn index_of(t: Tid) -> usize {
    ((t.0 - 1000) / 7) as usize
}

fn revision_data(oid: Oid, start: Tid) -> Bytes {
    let len = (oid.0.wrapping_mul(31) ^ start.0.wrapping_mul(17)) % 3000 + 1;
    data(oid.0, start.0, len as usize)
}

impl History {
    fn new() -> History {
        let mut rng = Rng(42);
        let mut txns = vec![(0..OIDS).map(Oid).collect::<Vec<_>>()];
        let mut revs = vec![vec![tid(0)]; OIDS as usize];
        for i in 1..TXNS {
            let n = 1 + rng.below(4);
            let mut oids: Vec<Oid> = (0..n).map(|_| Oid(rng.below(OIDS))).collect();
            oids.sort();
            oids.dedup();
            for o in &oids {
                revs[o.0 as usize].push(tid(i));
            }
            txns.push(oids);
        }
        History { txns, revs }
    }

    /// The revision of `oid` current at `t` (the last one at or before it).
    fn current_at(&self, oid: Oid, t: Tid) -> Option<Tid> {
        let revs = &self.revs[oid.0 as usize];
        let n = revs.partition_point(|&r| r <= t);
        n.checked_sub(1).map(|i| revs[i])
    }

    /// The revision after `start`, if any.
    fn next_after(&self, oid: Oid, start: Tid) -> Option<Tid> {
        let revs = &self.revs[oid.0 as usize];
        revs.get(revs.partition_point(|&r| r <= start)).copied()
    }

    fn is_revision(&self, oid: Oid, start: Tid) -> bool {
        self.revs[oid.0 as usize].binary_search(&start).is_ok()
    }

    /// Checks one `load_before(oid, before)` answer; `last` is the cache's last tid.
    fn check_load(&self, oid: Oid, before: Tid, last: Tid, got: Option<&CachedRevision>) {
        let Some(r) = got else { return };
        assert!(r.start < before, "{oid:?} before {before:?}: {r:?}");
        assert!(
            self.is_revision(oid, r.start),
            "{oid:?}: no revision {:?}",
            r.start
        );
        assert!(
            r.data == revision_data(oid, r.start),
            "{oid:?}@{:?}: wrong bytes",
            r.start
        );
        let real_end = self.next_after(oid, r.start);
        match r.end {
            Some(e) => {
                assert!(before <= e, "{oid:?} before {before:?}: {r:?}");
                assert!(real_end.is_none_or(|re| e <= re), "{oid:?}: end {e:?} past {real_end:?}");
            }
            // Current: must be current at the cache's last tid (or newer than it).
            None => assert!(
                r.start > last || real_end.is_none_or(|re| re > last),
                "{oid:?}: stale current revision {:?} at last tid {last:?} (replaced at {real_end:?})",
                r.start
            ),
        }
        if before <= after(last) {
            assert_eq!(
                Some(r.start),
                self.current_at(oid, Tid(before.0 - 1)),
                "{oid:?} before {before:?}: not the revision current then"
            );
        }
    }

    /// Checks every answer the cache gives about every oid. Returns the number of hits.
    fn verify(&self, cache: &Cache, rng: &mut Rng) -> u64 {
        self.verify_oids(cache, rng, (0..OIDS).map(Oid))
    }

    /// Checks every answer the cache gives about `oids`. Returns the number of hits.
    fn verify_oids(&self, cache: &Cache, rng: &mut Rng, oids: impl Iterator<Item = Oid>) -> u64 {
        let last = cache.last_tid();
        let mut hits = 0;
        for oid in oids {
            let mut befores = vec![Tid::MAX, after(last)];
            for _ in 0..3 {
                befores.push(Tid(tid(0).0
                    + 1
                    + rng.below(after(last).0.saturating_sub(tid(0).0).max(1))));
            }
            for before in befores {
                let got = cache.load_before(oid, before);
                self.check_load(oid, before, last, got.as_ref());
                hits += u64::from(got.is_some());
            }
            // The revision current at `last` must be exactly that one, or a miss.
            if let Some(r) = cache.load_before(oid, after(last)) {
                assert_eq!(
                    Some(r.start),
                    self.current_at(oid, last),
                    "{oid:?} at {last:?}"
                );
            }
            for &start in self.revs[oid.0 as usize]
                .iter()
                .take_while(|&&s| s <= tid(index_of(last.max(tid(0))) + 20))
            {
                if let Some(d) = cache.load_serial(oid, start) {
                    assert!(
                        d == revision_data(oid, start),
                        "{oid:?}@{start:?}: wrong bytes"
                    );
                    hits += 1;
                }
            }
        }
        hits
    }
}

/// The seed of a test's schedule: `ZEORS_CACHE_CRASH_TEST_SEED` to explore others, a
/// fixed one by default.
fn test_seed() -> u64 {
    let seed = std::env::var("ZEORS_CACHE_CRASH_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_261_126);
    eprintln!("crash test seed: ZEORS_CACHE_CRASH_TEST_SEED={seed}");
    seed
}

/// Drives `cache` through `steps` operations of the history, continuing from its last tid;
/// calls `flushed` with the last tid after each flush returns.
fn drive(cache: &Cache, h: &History, rng: &mut Rng, steps: usize, mut flushed: impl FnMut(Tid)) {
    let mut i = if cache.last_tid() == Tid::ZERO {
        cache.drop_current(tid(0));
        0
    } else {
        index_of(cache.last_tid())
    };
    // Catching up after a restart, one way or another.
    match rng.below(4) {
        0 => {
            let k = 1 + rng.below(30) as usize;
            let oids: Vec<Oid> = h.txns[i + 1..=i + k].iter().flatten().copied().collect();
            cache.invalidate_many(tid(i + k), &oids);
            i += k;
        }
        1 if rng.chance(20) => {
            i += rng.below(5) as usize;
            cache.drop_current(tid(i));
        }
        _ => {}
    }
    for _ in 0..steps {
        assert_eq!(cache.last_tid(), tid(i));
        if i + 100 >= TXNS {
            return;
        }
        let oid = Oid(rng.below(OIDS));
        let r = rng.below(1000);
        if r < 300 {
            i += 1;
            cache.invalidate(tid(i), &h.txns[i]);
        } else if r < 330 {
            let k = 2 + rng.below(20) as usize;
            let oids: Vec<Oid> = h.txns[i + 1..=i + k].iter().flatten().copied().collect();
            cache.invalidate_many(tid(i + k), &oids);
            i += k;
        } else if r < 333 {
            i += rng.below(3) as usize;
            cache.drop_current(tid(i));
        } else if r < 600 {
            // An answer that saw everything applied so far, or a bit less, or a bit more.
            let seen = match rng.below(10) {
                0 => tid(i.saturating_sub(rng.below(30) as usize)),
                1 => tid(i + 1 + rng.below(10) as usize),
                _ => tid(i),
            };
            if let Some(start) = h.current_at(oid, seen) {
                cache.store(oid, start, None, revision_data(oid, start), seen);
            }
        } else if r < 680 {
            let revs = &h.revs[oid.0 as usize];
            let k = rng.below(revs.len() as u64) as usize;
            if let Some(&end) = revs.get(k + 1).filter(|&&e| e <= tid(i + 10)) {
                cache.store(oid, revs[k], Some(end), revision_data(oid, revs[k]), tid(i));
            }
        } else if r < 990 {
            let last = cache.last_tid();
            let before = match rng.below(3) {
                0 => Tid::MAX,
                1 => after(last),
                _ => Tid(tid(0).0 + 1 + rng.below(last.0 - tid(0).0 + 1)),
            };
            h.check_load(oid, before, last, cache.load_before(oid, before).as_ref());
        } else {
            cache.flush().unwrap();
            flushed(cache.last_tid());
        }
    }
}

/// The child of the process-crash test: drives the cache for the number of steps it is
/// given, then aborts (no destructor runs, nothing is flushed).
#[test]
#[ignore = "helper process of crash_safety_under_process_crashes; does nothing unless started by it"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else {
        return;
    };
    let env = |k: &str| -> u64 {
        std::env::var(k)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1)
    };
    let h = History::new();
    let mut rng = Rng(env(SEED_ENV));
    let cache = Cache::open(config(Path::new(&dir), MAX_BYTES)).unwrap();
    drive(&cache, &h, &mut rng, env(STEPS_ENV) as usize, |_| {});
    std::process::abort();
}

#[test]
fn crash_safety_under_process_crashes() {
    use std::os::unix::process::ExitStatusExt;
    let h = History::new();
    let exe = std::env::current_exe().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cache");
    let stderr_path = tmp.path().join("child.stderr");
    let seed = test_seed();
    let mut rng = Rng(seed);
    let (mut hits, mut advanced) = (0, 0);
    let mut last = Tid::ZERO;
    for round in 0..30u64 {
        let steps = 300 + rng.below(1700);
        let status = Command::new(&exe)
            .args([
                "--exact",
                "cache::tests::crash::crash_child",
                "--ignored",
                "--nocapture",
            ])
            .args(["--test-threads", "1"])
            .env(DIR_ENV, &dir)
            .env(SEED_ENV, seed.wrapping_add(round).to_string())
            .env(STEPS_ENV, steps.to_string())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path).unwrap())
            .status()
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(libc_sigabrt()),
            "round {round}: the child did not crash where it should ({status}):\n{}",
            fs::read_to_string(&stderr_path).unwrap_or_default()
        );

        let cache = Cache::open(config(&dir, MAX_BYTES)).unwrap();
        let now = cache.last_tid();
        assert!(
            now >= last,
            "round {round}: last tid went back from {last:?} to {now:?}"
        );
        if now > last {
            advanced += 1;
        }
        last = now;
        hits += h.verify(&cache, &mut rng);
        assert!(segment_bytes(&dir) <= MAX_BYTES, "round {round}");
        if rng.chance(50) {
            cache.close().unwrap();
        } else {
            drop(cache);
        }
    }
    eprintln!("process crashes: {hits} verified hits, last tid advanced in {advanced} rounds");
    assert!(
        advanced >= 15,
        "the child made too little progress ({advanced} rounds)"
    );
    assert!(hits > 1000, "too few hits to mean anything ({hits})");
}

/// SIGABRT, the signal `std::process::abort` ends the process with.
fn libc_sigabrt() -> i32 {
    6
}

const SIM_DIR: &str = "/cache";
/// Rounds of work, each crashed, the next one started from one of its images.
const ROUNDS: usize = 6;
/// Crash images checked at each crash point beyond the first two.
const SAMPLE: usize = 2;
/// Oids whose every answer is checked in each crash image.
const VERIFIED_OIDS: u64 = 30;

/// The checks of one crash image; returns the image's last tid and the hits verified.
fn check_image(h: &History, image: &SimFs, rng: &mut Rng) -> Result<(Tid, u64), String> {
    let fs: Arc<dyn Fs> = Arc::new(image.clone());
    let cache = Cache::open_on(fs.clone(), config(Path::new(SIM_DIR), MAX_BYTES))
        .map_err(|e| format!("reopen failed: {e}"))?;
    let last = cache.last_tid();
    // A sample of the oids: with a few hundred images per round, all of them every time
    // would take minutes.
    let first = rng.below(OIDS);
    let hits = h.verify_oids(
        &cache,
        rng,
        (0..VERIFIED_OIDS).map(|k| Oid((first + k * 7) % OIDS)),
    );
    let segments: u64 = fs
        .read_dir(&Path::new(SIM_DIR).join(SEGMENTS_DIR))
        .map_err(|e| e.to_string())?
        .iter()
        .map(|e| {
            fs.metadata(&Path::new(SIM_DIR).join(SEGMENTS_DIR).join(&e.name))
                .map_or(0, |m| m.len)
        })
        .sum();
    if segments > MAX_BYTES {
        return Err(format!("{segments} bytes of segments"));
    }
    // The reopened cache keeps working.
    drive(&cache, h, rng, 20, |_| {});
    cache
        .flush()
        .map_err(|e| format!("flush after recovery: {e}"))?;
    Ok((last, hits))
}

#[test]
fn crash_images_of_the_cache() {
    crash_images(ROUNDS, None);
}

/// The negative control: with the index file's syncs forgotten, a flush makes nothing
/// durable, and the images must show a cache whose last tid went back behind a flush.
#[test]
fn negative_control_an_index_never_synced_forgets_flushes() {
    let e = std::panic::catch_unwind(|| crash_images(2, Some("index.redb"))).unwrap_err();
    let e = e.downcast_ref::<String>().cloned().unwrap_or_default();
    eprintln!("as expected: {e}");
    assert!(e.contains("was flushed"), "{e}");
}

/// Runs `rounds` rounds of work on a simulated disk and checks crash images of each (see
/// the module docs); with `forget`, the syncs of that file are forgotten.
fn crash_images(rounds: usize, forget: Option<&'static str>) {
    let h = History::new();
    let seed = test_seed();
    let mut rng = Rng(seed);
    let mut disk = SimFs::new();
    disk.create_dir(Path::new(SIM_DIR)).unwrap();
    disk.sync_dir(Path::new("/")).unwrap();
    let (mut images, mut hits, mut advanced, mut unsynced_points) = (0u64, 0u64, 0, 0);
    let mut last = Tid::ZERO;
    for round in 0..rounds {
        let started = std::time::Instant::now();
        let images_before = images;
        let flushes = std::cell::RefCell::new(Vec::new());
        let fs: Arc<dyn Fs> = match forget {
            None => Arc::new(disk.clone()),
            Some(suffix) => Arc::new(Forgetful {
                inner: disk.clone(),
                file_suffix: Some(suffix),
                dirs_under: None,
            }),
        };
        let cache = Cache::open_on(fs, config(Path::new(SIM_DIR), MAX_BYTES)).unwrap();
        // What the open made durable counts as flushed too.
        flushes
            .borrow_mut()
            .push((disk.op_count(), cache.last_tid()));
        let steps = 300 + rng.below(700) as usize;
        drive(&cache, &h, &mut rng, steps, |t| {
            flushes.borrow_mut().push((disk.op_count(), t))
        });
        let end = disk.op_count();
        let log = disk.ops_since(0);
        // Crash points: just before and after every sync, and a few in between.
        let mut points: Vec<usize> = log
            .iter()
            .enumerate()
            .filter(|(_, op)| {
                matches!(
                    op,
                    fsio::simfs::FsOp::SyncDir { .. }
                        | fsio::simfs::FsOp::Data {
                            op: fsio::sim::SimOp::Sync,
                            ..
                        }
                )
            })
            .flat_map(|(i, _)| [i, i + 1])
            .collect();
        points.extend((0..8).map(|_| rng.below(end as u64 + 1) as usize));
        points.push(end);
        points.sort_unstable();
        points.dedup();
        let flushes = flushes.into_inner();
        for &at in &points {
            let durable = flushes
                .iter()
                .filter(|(pos, _)| *pos <= at)
                .map(|&(_, t)| t)
                .max()
                .unwrap_or(last);
            let all = disk.crash_images(at, Torn::InOrder(4096));
            // The first two (every unsynced write lost, every one complete) and a sample
            // of the others, evenly spread: there can be thousands.
            let sample = 2 + (all.len() - 2.min(all.len())).min(SAMPLE);
            let picks = (0..all.len().min(2))
                .chain((0..sample - 2).map(|k| 2 + k * (all.len() - 2) / (sample - 2).max(1)));
            for image in picks.map(|n| all.get(n)) {
                let (now, n) = check_image(&h, &image, &mut rng)
                    .unwrap_or_else(|e| panic!("round {round}, crash at operation {at}: {e}"));
                assert!(
                    now >= durable && now >= last,
                    "round {round}, crash at operation {at}: last tid {now:?}, but {durable:?} was flushed"
                );
                hits += n;
                images += 1;
            }
            unsynced_points += usize::from(all.len() > 2);
        }
        // The next round starts from an image of this round's end.
        let next = disk.crash_images(end, Torn::Never);
        let pick = rng.below(next.len() as u64) as usize;
        drop(cache);
        disk = next.get(pick);
        let now = Cache::open_on(
            Arc::new(disk.snapshot()),
            config(Path::new(SIM_DIR), MAX_BYTES),
        )
        .unwrap()
        .last_tid();
        if now > last {
            advanced += 1;
        }
        last = now;
        eprintln!(
            "round {round}: {} operations, {} crash points, {} images in {:.1} s",
            end,
            points.len(),
            images - images_before,
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "power loss: {images} crash images checked ({unsynced_points} points with unsynced writes), \
         {hits} verified hits, last tid advanced in {advanced} of {rounds} rounds"
    );
    assert!(images > 50 * rounds as u64, "{images} images");
    assert!(
        hits > 400 * rounds as u64,
        "too few hits to mean anything ({hits})"
    );
    assert!(
        advanced >= rounds / 2,
        "too little progress ({advanced} rounds)"
    );
}
