//! Two `PgStorage`s (as in two zeors servers) on one real PostgreSQL database: commits
//! reach the other's sink in tid order, and a transaction waiting for its client to
//! resolve conflicts keeps its object locks against the other server until it aborts.

mod cluster;

use bytes::Bytes;
use parking_lot::Mutex;
use relstorage::{Layout, Options, PgStorage};
use std::sync::Arc;
use std::time::Duration;
use zodb::{
    InvalidationSink, Oid, Storage, Tid, Transaction, TransactionMeta, TxnKey, TxnOp, Vote,
};

/// One announcement: tid, oids, committer.
type Announced = (Tid, Vec<Oid>, Option<TxnKey>);

#[derive(Default)]
struct Recorder(Mutex<Vec<Announced>>);

impl InvalidationSink for Recorder {
    fn invalidate(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>) {
        self.0.lock().push((tid, oids.to_vec(), committer));
    }
}

async fn open(dsn: &str, layout: Layout) -> (PgStorage, Arc<Recorder>) {
    let mut o = Options::new(dsn);
    o.layout = layout;
    o.poll_interval = Duration::from_secs(3600); // only NOTIFY can wake it in time
    let s = PgStorage::open(o).await.expect("open");
    let r = Arc::new(Recorder::default());
    s.attach(r.clone());
    (s, r)
}

fn store(key: TxnKey, oid: Oid, serial: Tid, data: &'static [u8]) -> Transaction {
    Transaction {
        key,
        meta: TransactionMeta {
            status: b' ',
            ..Default::default()
        },
        ops: vec![TxnOp::Store {
            oid,
            serial,
            data: Bytes::from_static(data),
        }],
    }
}

async fn commit(s: &PgStorage, txn: &Transaction) -> Tid {
    match s.vote(txn).await.expect("vote") {
        Vote::Ok { .. } => {}
        Vote::Conflicts(c) => panic!("unexpected conflicts {c:?}"),
    }
    s.finish(txn.key).await.expect("finish")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_reach_the_other_server_in_order_and_conflict_locks_hold() {
    let pg = cluster::Cluster::start();
    for layout in [Layout::HistoryPreserving, Layout::HistoryFree] {
        let dsn = pg.new_database().await;
        let (a, ra) = open(&dsn, layout).await;
        let (b, rb) = open(&dsn, layout).await;
        let oid = a.new_oids(1).await.unwrap()[0];
        let mut tids = Vec::new();
        for (i, s) in [&a, &b, &a, &b].into_iter().enumerate() {
            let serial = tids.last().copied().unwrap_or(Tid::ZERO);
            tids.push(commit(s, &store(i as u64 + 1, oid, serial, b"state")).await);
        }
        assert!(tids.windows(2).all(|w| w[0] < w[1]), "{tids:?}");
        // Each server announced the commits in tid order, naming only its own committer.
        // History-preserving: all four. History-free keeps one tid per object, so a
        // server may see only the later of two commits it had not caught up with yet.
        let last = *tids.last().unwrap();
        for (r, mine) in [(&ra, [1u64, 3]), (&rb, [2, 4])] {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while r.0.lock().last().map(|e| e.0) != Some(last) {
                assert!(
                    std::time::Instant::now() < deadline,
                    "NOTIFY did not arrive"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let got = r.0.lock().clone();
            let seen: Vec<Tid> = got.iter().map(|e| e.0).collect();
            if layout == Layout::HistoryPreserving {
                assert_eq!(seen, tids);
            } else {
                assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
                assert!(seen.iter().all(|t| tids.contains(t)), "{seen:?}");
            }
            for (tid, oids, committer) in got {
                assert_eq!(oids, vec![oid]);
                let key = tids.iter().position(|t| *t == tid).unwrap() as u64 + 1;
                assert_eq!(committer, mine.contains(&key).then_some(key));
            }
        }
        assert_eq!(a.last_transaction(), last);
        assert_eq!(b.last_transaction(), last);

        // A stale store on A conflicts; A keeps the object locked while its client
        // resolves, so B's commit of the same object waits until A aborts.
        let stale = store(10, oid, tids[0], b"stale");
        match a.vote(&stale).await.unwrap() {
            Vote::Conflicts(c) => assert_eq!((c[0].oid, c[0].committed), (oid, last)),
            other => panic!("{other:?}"),
        }
        let b_txn = store(11, oid, last, b"from b");
        let waiting = tokio::time::timeout(Duration::from_millis(700), b.vote(&b_txn)).await;
        assert!(waiting.is_err(), "B voted while A held the object lock");
        a.abort(10).await;
        let t = commit(&b, &b_txn).await;
        let lb = a.load_before(oid, Tid::MAX).await.unwrap();
        // A may not have announced B's commit when it loaded; if it had, it serves it.
        if lb.snapshot >= t {
            assert_eq!(lb.revision.unwrap().data, Bytes::from_static(b"from b"));
        }
        b.sync().await.unwrap();
        let lb = b.load_before(oid, Tid::MAX).await.unwrap();
        assert_eq!(lb.revision.unwrap().start, t);
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
}

/// A sink that records, and holds the announcing task inside `invalidate` of the first
/// transaction changing one oid until released (a watcher busy announcing, while other
/// things happen).
#[derive(Default)]
struct Gated {
    seen: Mutex<Vec<Announced>>,
    hold_on: Mutex<Option<Oid>>,
    held: std::sync::Mutex<bool>,
    release: std::sync::Condvar,
}

impl InvalidationSink for Gated {
    fn invalidate(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>) {
        self.seen.lock().push((tid, oids.to_vec(), committer));
        let hold = {
            let mut h = self.hold_on.lock();
            let hit = h.is_some_and(|o| oids.contains(&o));
            if hit {
                *h = None;
            }
            hit
        };
        if hold {
            // Blocking a runtime worker: hand its queued tasks to another thread first.
            tokio::task::block_in_place(|| {
                let mut held = self.held.lock().unwrap();
                *held = true;
                while *held {
                    held = self.release.wait(held).unwrap();
                }
            });
        }
    }
}

impl Gated {
    fn is_holding(&self) -> bool {
        *self.held.lock().unwrap()
    }
    fn open_gate(&self) {
        *self.held.lock().unwrap() = false;
        self.release.notify_all();
    }
}

/// Opens the gate when dropped, so that a failing test ends instead of leaving a
/// runtime worker held.
struct OpenOnDrop(Arc<Gated>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        *self.0.hold_on.lock() = None;
        self.0.open_gate();
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// In a history-free database a transaction of this server can be replaced entirely by
/// a later one (another writer's) before it is announced. Its committer learns its tid
/// from the `tpc_finish` reply and a ZEO client refuses a tid lower than one it was sent
/// before, so this server must announce its own commit at its tid, naming its committer,
/// before the later one — whether the later one is found by the finisher itself or by a
/// load (or the watcher) catching up first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_own_commit_replaced_before_it_is_announced_is_still_announced_first() {
    let pg = cluster::Cluster::start();
    let dsn = pg.new_database().await;
    let (b, rb) = open(&dsn, Layout::HistoryFree).await;
    let mut o = Options::new(&dsn);
    o.layout = Layout::HistoryFree;
    o.poll_interval = Duration::from_secs(3600); // only NOTIFY wakes its watcher
    let a = Arc::new(PgStorage::open(o).await.expect("open"));
    let ra = Arc::new(Gated::default());
    a.attach(ra.clone());
    let _gate = OpenOnDrop(ra.clone());
    let oids = b.new_oids(3).await.unwrap();
    let (counter, other, third) = (oids[0], oids[1], oids[2]);

    // A is held announcing W (B's commit of another object) by its watcher, woken by
    // B's NOTIFY, or by a sync: the announcing turn is taken.
    *ra.hold_on.lock() = Some(other);
    commit(&b, &store(1, other, Tid::ZERO, b"w")).await;
    let a_sync = a.clone();
    let syncing = tokio::spawn(async move { a_sync.sync().await });
    wait_until("A held announcing W", || ra.is_holding()).await;

    // B commits V (a third object); a load of it on A must catch up first, and waits
    // for the announcing turn.
    let v = commit(&b, &store(2, third, Tid::ZERO, b"v")).await;
    let a_load = a.clone();
    let load = tokio::spawn(async move { a_load.load_before(third, Tid::MAX).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A commits X (the counter); its finisher waits for the turn after the load.
    let x_txn = store(10, counter, Tid::ZERO, b"x");
    match a.vote(&x_txn).await.unwrap() {
        Vote::Ok { .. } => {}
        v => panic!("{v:?}"),
    }
    let a_fin = a.clone();
    let finish = tokio::spawn(async move { a_fin.finish(10).await });
    // B hears of X and replaces it: Y is the counter's only row now.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rb.0.lock().last().is_none_or(|e| e.1 != vec![counter]) {
        assert!(std::time::Instant::now() < deadline, "timed out: B sees X");
        b.sync().await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let x = rb.0.lock().last().unwrap().0;
    assert!(x > v);
    let y = commit(&b, &store(11, counter, x, b"y")).await;

    let before = ra.seen.lock().len();
    ra.open_gate();
    assert_eq!(finish.await.unwrap().unwrap(), x);
    load.await.unwrap().unwrap();
    syncing.await.unwrap().unwrap();
    a.sync().await.unwrap();
    let seen: Vec<Announced> = ra.seen.lock()[before..].to_vec();
    assert_eq!(
        seen,
        vec![
            (v, vec![third], None),
            (x, vec![counter], Some(10)),
            (y, vec![counter], None),
        ]
    );
    let lb = a.load_before(counter, Tid::MAX).await.unwrap();
    assert_eq!(lb.revision.unwrap().start, y);
    a.close().await.unwrap();
    b.close().await.unwrap();
}
