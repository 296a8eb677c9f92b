//! Open-time benchmark of a large cache (ignored; run in release):
//!
//! ```text
//! cargo test -p proxy --release cache::tests::bench -- --ignored --nocapture
//! ```
//! `ZEORS_CACHE_BENCH_GB` sets the data size (default 1), `ZEORS_CACHE_BENCH_DIR` the
//! directory (default a temporary one under /tmp).

use super::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const CHILD_ENV: &str = "ZEORS_CACHE_BENCH_CHILD_DIR";
const RECORD: usize = 4096;

fn max_bytes(gib: u64) -> u64 {
    gib * 1024 * MIB + gib * 100 * MIB
}

fn timed_open(dir: &Path, max: u64) -> (Cache, Duration) {
    let started = Instant::now();
    let cache = Cache::open(config(dir, max)).unwrap();
    (cache, started.elapsed())
}

#[test]
#[ignore = "benchmark: builds a large cache"]
fn open_time_of_a_large_cache() {
    let gib: u64 = std::env::var("ZEORS_CACHE_BENCH_GB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let dir = std::env::var("ZEORS_CACHE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| tmp.path().join("cache"));
    let _ = fs::remove_dir_all(&dir);
    let max = max_bytes(gib);
    let records = gib * 1024 * MIB / RECORD as u64;

    let started = Instant::now();
    let cache = Cache::open(config(&dir, max)).unwrap();
    cache.drop_current(Tid(1));
    let mut t = 1u64;
    for i in 0..records {
        if i % 10 == 0 {
            t += 1;
            cache.invalidate(Tid(t), &[Oid(i / 2), Oid(i / 3)]);
        }
        cache.store(Oid(i), Tid(1), None, data(i, 1, RECORD), Tid(t));
        if i % 50_000 == 0 {
            cache.flush().unwrap();
        }
    }
    let stats = cache.stats();
    cache.close().unwrap();
    let build = started.elapsed();
    let index_size = fs::metadata(dir.join(INDEX_FILE)).unwrap().len();
    eprintln!(
        "built {records} records in {build:?} ({:.1} MB/s): {stats:?}, index {} MB, {} segments",
        (records * RECORD as u64) as f64 / build.as_secs_f64() / 1e6,
        index_size >> 20,
        segment_files(&dir).len()
    );

    let (cache, clean) = timed_open(&dir, max);
    eprintln!("reopen after clean close: {clean:?}, {:?}", cache.stats());
    assert_eq!(
        cache
            .load_before(Oid(records - 1), Tid::MAX)
            .map(|r| r.data),
        Some(data(records - 1, 1, RECORD))
    );
    drop(cache);

    for round in 0..3 {
        // A child writes (with periodic flushes) and is killed with SIGKILL mid-way.
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cache::tests::bench::bench_child",
                "--ignored",
                "--nocapture",
            ])
            .env(CHILD_ENV, &dir)
            .env("ZEORS_CACHE_BENCH_GB", gib.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Past libtest's own lines, the child says when it has the cache open.
        let ready = BufReader::new(child.stdout.take().unwrap())
            .lines()
            .any(|line| line.is_ok_and(|l| l.starts_with("ready")));
        assert!(ready, "the child did not open the cache");
        std::thread::sleep(Duration::from_millis(1500 + 300 * round));
        child.kill().unwrap();
        child.wait().unwrap();
        let (cache, crashed) = timed_open(&dir, max);
        eprintln!(
            "reopen after kill -9 (round {round}): {crashed:?}, {:?}",
            cache.stats()
        );
        assert!(crashed < Duration::from_secs(10));
        drop(cache);
    }
    assert!(clean < Duration::from_secs(10));

    // Eviction stall: with the budget at what is on disk, every segment's worth of stores
    // evicts one segment (10% of its records read before, so copied forward).
    let budget = segment_bytes(&dir) + SEGMENT_HEADER_LEN;
    let (cache, opened) = timed_open(&dir, budget);
    let per_segment = segment_size(budget) / (RECORD as u64 + RECORD_HEADER_LEN);
    // (Oids 7 mod 10: the build and the children invalidated many multiples of 5.)
    for i in (7..records).step_by(10) {
        cache.load_before(Oid(i), Tid::MAX);
    }
    let t = cache.last_tid();
    let cache = Arc::new(cache);
    let done = Arc::new(AtomicBool::new(false));
    // Meanwhile, invalidations arrive every millisecond: how long do they wait?
    let invalidator = {
        let (cache, done) = (cache.clone(), done.clone());
        std::thread::spawn(move || {
            let (mut worst, mut n) = (Duration::ZERO, 0u64);
            while !done.load(Ordering::Relaxed) {
                n += 1;
                let s = Instant::now();
                cache.invalidate(Tid(t.0 + n), &[Oid(3)]);
                worst = worst.max(s.elapsed());
                std::thread::sleep(Duration::from_millis(1));
            }
            (n, worst)
        })
    };
    let (mut worst, started) = (Duration::ZERO, Instant::now());
    let n = 3 * per_segment;
    for i in 0..n {
        let s = Instant::now();
        cache.store(Oid((1 << 41) + i), t, None, data(i, 2, RECORD), t);
        worst = worst.max(s.elapsed());
    }
    done.store(true, Ordering::Relaxed);
    let (invalidations, worst_invalidation) = invalidator.join().unwrap();
    eprintln!("{invalidations} concurrent invalidations, slowest {worst_invalidation:?}");
    eprintln!(
        "full cache (opened in {opened:?}): {n} stores in {:?}, slowest (evicting {per_segment} records) {worst:?}, {:?}",
        started.elapsed(),
        cache.stats()
    );
}

#[test]
#[ignore = "helper process of open_time_of_a_large_cache"]
fn bench_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let gib: u64 = std::env::var("ZEORS_CACHE_BENCH_GB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let cache = Cache::open(config(Path::new(&dir), max_bytes(gib))).unwrap();
    println!("ready");
    let base = 1 << 40;
    let mut t = cache.last_tid().0;
    for i in 0u64.. {
        if i % 10 == 0 {
            t += 1;
            cache.invalidate(Tid(t), &[Oid(i)]);
        }
        cache.store(Oid(base + i), Tid(t), None, data(i, t, RECORD), Tid(t));
        if i % 3000 == 0 {
            cache.flush().unwrap();
        }
    }
}
