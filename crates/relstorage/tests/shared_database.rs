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
        // A may not have announced B's commit yet; when it has, it serves it.
        if a.last_transaction() >= t {
            assert_eq!(lb.revision.unwrap().data, Bytes::from_static(b"from b"));
        }
        b.sync().await.unwrap();
        let lb = b.load_before(oid, Tid::MAX).await.unwrap();
        assert_eq!(lb.revision.unwrap().start, t);
        a.close().await.unwrap();
        b.close().await.unwrap();
    }
}
