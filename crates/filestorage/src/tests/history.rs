//! Undo, undo log, iteration and `record_iternext` at the storage level.

use super::*;
use crate::iter::RecordIter;
use crate::scan;
use crate::undo::UndoResolution;
use parking_lot::Mutex;
use zodb::{Conflict, DataRecord, InvalidationSink, StorageError, TxnKey, UndoEntry};

/// A record pickle as ZODB writes it (protocol 3): class `module.name`, then a state
/// tuple holding `(oid, class)` references to `refs` and the text `payload`.
pub(crate) fn record(module: &str, name: &str, refs: &[u64], payload: &str) -> Vec<u8> {
    let mut p = b"\x80\x03c".to_vec();
    p.extend_from_slice(module.as_bytes());
    p.push(b'\n');
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"\nq\x00.\x80\x03(");
    for r in refs {
        p.extend_from_slice(b"C\x08");
        p.extend_from_slice(&r.to_be_bytes());
        p.extend_from_slice(b"h\x00\x86Q");
    }
    p.extend_from_slice(b"X");
    let len = u32::try_from(payload.len()).expect("a short payload");
    p.extend_from_slice(&len.to_le_bytes());
    p.extend_from_slice(payload.as_bytes());
    p.extend_from_slice(b"t.");
    p
}

pub(crate) fn obj(refs: &[u64], payload: &str) -> Vec<u8> {
    record("persistent.mapping", "PersistentMapping", refs, payload)
}

pub(crate) fn undo(tid: Tid) -> TxnOp {
    TxnOp::Undo {
        transaction_id: zodb::undo_id(tid),
    }
}

/// Votes and finishes `t`; returns the tid and the vote's `changed` list.
pub(crate) fn commit_changed(core: &FileStorageCore, t: &Transaction) -> (Tid, Vec<Oid>) {
    let changed = match core.vote(t).expect("vote") {
        Vote::Ok { changed } => changed,
        Vote::Conflicts(c) => panic!("unexpected conflicts {c:?}"),
    };
    (core.finish(t.key).expect("finish"), changed)
}

fn serial(core: &FileStorageCore, oid: u64) -> Tid {
    core.load(Oid(oid)).map(|l| l.1).unwrap_or(Tid::ZERO)
}

fn data(core: &FileStorageCore, oid: u64) -> Option<Bytes> {
    core.load(Oid(oid)).ok().map(|l| l.0)
}

#[derive(Default)]
struct Sink(Mutex<Vec<(Tid, Vec<Oid>)>>);

impl InvalidationSink for Sink {
    fn invalidate(&self, tid: Tid, oids: &[Oid], _committer: Option<TxnKey>) {
        self.0.lock().push((tid, oids.to_vec()));
    }
}

#[test]
fn undo_a_change_then_undo_the_undo() {
    let (sim, core) = sim_storage(writable());
    let sink = Arc::new(Sink::default());
    core.attach(sink.clone());
    let a = obj(&[], "a");
    let b = obj(&[], "b");
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &a)]));
    let t2 = commit(&core, &txn(2, vec![store(1, t1, &b)]));
    let (t3, changed) = commit_changed(&core, &txn(3, vec![undo(t2)]));
    assert_eq!(changed, vec![Oid(1)]);
    assert_eq!(sink.0.lock().last().unwrap(), &(t3, vec![Oid(1)]));
    assert_eq!(core.load(Oid(1)).unwrap(), (Bytes::from(a.clone()), t3));
    let h = core.history(Oid(1), 10).unwrap();
    assert_eq!(
        h.iter().map(|e| (e.tid, e.size)).collect::<Vec<_>>(),
        vec![(t3, 0), (t2, b.len() as u64), (t1, a.len() as u64)]
    );
    // loadBefore sees the right revision at every time.
    assert_eq!(
        &core.load_before(Oid(1), t3).unwrap().revision.unwrap().data[..],
        &b[..]
    );
    assert_eq!(core.load_serial(Oid(1), t3).unwrap(), &a[..]);

    // Undoing the undo brings b back.
    let (t4, changed) = commit_changed(&core, &txn(4, vec![undo(t3)]));
    assert_eq!(changed, vec![Oid(1)]);
    assert_eq!(core.load(Oid(1)).unwrap(), (Bytes::from(b.clone()), t4));
    scan::verify(&*sim).unwrap();
}

#[test]
fn undo_a_creation_and_bring_it_back() {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(&core, &txn(1, vec![store(0, Tid::ZERO, &obj(&[], "root"))]));
    let x = obj(&[], "x");
    let t2 = commit(
        &core,
        &txn(
            2,
            vec![store(0, t1, &obj(&[1], "root")), store(1, Tid::ZERO, &x)],
        ),
    );
    let (t3, changed) = commit_changed(&core, &txn(3, vec![undo(t2)]));
    assert_eq!(changed, vec![Oid(0), Oid(1)]);
    assert!(matches!(core.load(Oid(1)), Err(StorageError::PosKey(_))));
    assert!(matches!(core.get_tid(Oid(1)), Err(StorageError::PosKey(_))));
    assert_eq!(&core.load(Oid(0)).unwrap().0[..], &obj(&[], "root")[..]);
    // As of t2 the object existed; as of t1 it did not.
    assert_eq!(
        &core.load_before(Oid(1), t3).unwrap().revision.unwrap().data[..],
        &x[..]
    );
    assert!(core.load_before(Oid(1), t2).unwrap().revision.is_none());
    assert_eq!(core.len(), 2);

    // The iterator reports the uncreation as data None.
    let mut it = core.iterator(Some(t3), None).unwrap();
    let (t, _) = it.next_txn().unwrap().unwrap();
    let mut recs = RecordIter::new(core.view(), t);
    let r0 = recs.next_record().unwrap().unwrap();
    assert_eq!((r0.oid, r0.data_txn), (Oid(0), Some(t1)));
    assert_eq!(
        recs.next_record().unwrap().unwrap(),
        DataRecord {
            oid: Oid(1),
            tid: t3,
            data: None,
            data_txn: None
        }
    );

    // Undoing the uncreation brings the object back.
    commit_changed(&core, &txn(4, vec![undo(t3)]));
    assert_eq!(&core.load(Oid(1)).unwrap().0[..], &x[..]);
    scan::verify(&*sim).unwrap();
}

#[test]
fn undo_is_refused_when_objects_changed_since() {
    let (_, core) = sim_storage(writable());
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &obj(&[], "a"))]));
    let t2 = commit(&core, &txn(2, vec![store(1, t1, &obj(&[], "b"))]));
    let _t3 = commit(&core, &txn(3, vec![store(1, t2, &obj(&[], "c"))]));
    match core.vote(&txn(4, vec![undo(t2)])) {
        Err(StorageError::MultipleUndo(errs)) => assert_eq!(
            errs,
            vec![(
                Oid(1),
                "Some data were modified by a later transaction".into()
            )]
        ),
        other => panic!("{other:?}"),
    }
    // The creation cannot be undone either, now that the object changed.
    match core.vote(&txn(5, vec![undo(t1)])) {
        Err(StorageError::MultipleUndo(errs)) => assert_eq!(
            errs,
            vec![(
                Oid(1),
                "Can't undo an add transaction followed by conflicting transactions.".into()
            )]
        ),
        other => panic!("{other:?}"),
    }
    // Nothing was written.
    assert_eq!(core.history(Oid(1), 10).unwrap().len(), 3);

    // A later change back to the same bytes does not block the undo.
    let (_, core) = sim_storage(writable());
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &obj(&[], "a"))]));
    let t2 = commit(&core, &txn(2, vec![store(1, t1, &obj(&[], "b"))]));
    commit(
        &core,
        &txn(3, vec![store(2, Tid::ZERO, &obj(&[], "other"))]),
    );
    let t4 = commit(&core, &txn(4, vec![store(1, t2, &obj(&[], "b"))]));
    let (t5, _) = commit_changed(&core, &txn(5, vec![undo(t2)]));
    assert_eq!(data(&core, 1).unwrap(), &obj(&[], "a")[..]);
    assert!(t5 > t4);
}

#[test]
fn bad_undo_ids_and_errors() {
    let (_, core) = sim_storage(writable());
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &obj(&[], "a"))]));
    for id in [
        b"garbage!".to_vec(),
        b"".to_vec(),
        zodb::undo_id(Tid(t1.0 + 1)),
    ] {
        match core.vote(&txn(2, vec![TxnOp::Undo { transaction_id: id }])) {
            Err(StorageError::Undo { reason, oid: None }) => {
                assert_eq!(reason, "Invalid transaction id")
            }
            other => panic!("{other:?}"),
        }
    }
    // The storage is still usable.
    commit(&core, &txn(3, vec![store(1, t1, &obj(&[], "b"))]));
}

#[test]
fn undo_conflicts_of_resolvable_classes_go_to_the_client() {
    let (_, core) = sim_storage(Options {
        undo_resolution: UndoResolution {
            extra: vec!["my.app.Counter".into()],
        },
        ..writable()
    });
    let v = |n: &str| record("my.app", "Counter", &[], n);
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &v("1"))]));
    let t2 = commit(&core, &txn(2, vec![store(1, t1, &v("2"))]));
    let t3 = commit(&core, &txn(3, vec![store(1, t2, &v("3"))]));
    let mut t = txn(4, vec![undo(t2)]);
    match core.vote(&t).unwrap() {
        Vote::Conflicts(c) => assert_eq!(
            c,
            vec![Conflict {
                oid: Oid(1),
                committed: t3,
                read: t2,
                data: Bytes::from(v("1")),
            }]
        ),
        other => panic!("{other:?}"),
    }
    // The client resolves and stores the result against the committed serial.
    t.ops.push(store(1, t3, &v("resolved")));
    let (t4, changed) = commit_changed(&core, &t);
    assert!(changed.is_empty());
    assert_eq!(core.load(Oid(1)).unwrap(), (Bytes::from(v("resolved")), t4));

    // Two undos of the same changed object in one transaction cannot be resolved by the
    // client: refused.
    let t5 = commit(&core, &txn(5, vec![store(1, t4, &v("5"))]));
    let _ = t5;
    match core.vote(&txn(6, vec![undo(t3), undo(t2)])) {
        Err(StorageError::MultipleUndo(errs)) => assert_eq!(errs[0].0, Oid(1)),
        other => panic!("{other:?}"),
    }
    // Classes not known to resolve fail as in Python.
    let t7 = commit(&core, &txn(7, vec![store(2, Tid::ZERO, &obj(&[], "a"))]));
    let t8 = commit(&core, &txn(8, vec![store(2, t7, &obj(&[], "b"))]));
    commit(&core, &txn(9, vec![store(2, t8, &obj(&[], "c"))]));
    assert!(matches!(
        core.vote(&txn(10, vec![undo(t8)])),
        Err(StorageError::MultipleUndo(_))
    ));
}

#[test]
fn btree_buckets_and_length_resolve_by_default() {
    let r = UndoResolution::default();
    assert!(r.resolvable("BTrees.OOBTree", "OOBucket"));
    let (_, core) = sim_storage(writable());
    let v = |n: &str| record("BTrees.Length", "Length", &[], n);
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &v("1"))]));
    let t2 = commit(&core, &txn(2, vec![store(1, t1, &v("2"))]));
    commit(&core, &txn(3, vec![store(1, t2, &v("3"))]));
    assert!(matches!(
        core.vote(&txn(4, vec![undo(t2)])).unwrap(),
        Vote::Conflicts(_)
    ));
}

#[test]
fn undo_of_several_transactions_and_objects() {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![
                store(1, Tid::ZERO, &obj(&[], "1a")),
                store(2, Tid::ZERO, &obj(&[], "2a")),
            ],
        ),
    );
    let t2 = commit(&core, &txn(2, vec![store(1, t1, &obj(&[], "1b"))]));
    let t3 = commit(&core, &txn(3, vec![store(2, t1, &obj(&[], "2b"))]));
    let (_, mut changed) = commit_changed(&core, &txn(4, vec![undo(t3), undo(t2)]));
    changed.sort();
    assert_eq!(changed, vec![Oid(1), Oid(2)]);
    assert_eq!(data(&core, 1).unwrap(), &obj(&[], "1a")[..]);
    assert_eq!(data(&core, 2).unwrap(), &obj(&[], "2a")[..]);
    // Undo and store of other objects in one transaction; the same transaction twice.
    let t5 = commit(&core, &txn(5, vec![store(3, Tid::ZERO, &obj(&[], "3"))]));
    let (t6, _) = commit_changed(
        &core,
        &txn(
            6,
            vec![undo(t5), store(1, serial(&core, 1), &obj(&[], "1c"))],
        ),
    );
    assert!(core.load(Oid(3)).is_err());
    assert_eq!(core.load(Oid(1)).unwrap().1, t6);
    scan::verify(&*sim).unwrap();
}

fn entries(core: &FileStorageCore, first: i64, last: i64) -> Vec<Tid> {
    core.undo_log(first, last, None)
        .unwrap()
        .iter()
        .map(|e| e.tid)
        .collect()
}

#[test]
fn undo_log_pages_and_filters() {
    let (_, core) = sim_storage(writable());
    let mut tids = Vec::new();
    for i in 0..30u64 {
        let mut t = txn(i, vec![store(i, Tid::ZERO, &obj(&[], "x"))]);
        t.meta.user = format!("user{}", i % 2).into_bytes();
        t.meta.description = format!("txn {i}").into_bytes();
        tids.push(commit(&core, &t));
    }
    tids.reverse();
    assert_eq!(entries(&core, 0, -20), tids[..20].to_vec());
    assert_eq!(entries(&core, 0, 20), tids[..20].to_vec());
    assert_eq!(entries(&core, 5, 10), tids[5..10].to_vec());
    assert_eq!(entries(&core, 25, -20), tids[25..].to_vec());
    assert_eq!(entries(&core, 0, 1000), tids);
    assert!(entries(&core, 40, 50).is_empty());
    let e = &core.undo_log(0, 1, None).unwrap()[0];
    assert_eq!(
        (e.user.as_slice(), e.description.as_slice()),
        (&b"user1"[..], &b"txn 29"[..])
    );
    assert_eq!(tid_from(&e.id()), e.tid);
    let only_user0: zodb::UndoFilter = Box::new(|e: &UndoEntry| e.user == b"user0");
    let got: Vec<Tid> = core
        .undo_log(2, 5, Some(&only_user0))
        .unwrap()
        .iter()
        .map(|e| e.tid)
        .collect();
    let user0: Vec<Tid> = tids.iter().copied().skip(1).step_by(2).collect();
    assert_eq!(got, user0[2..5].to_vec());
}

fn tid_from(id: &[u8]) -> Tid {
    zodb::tid_from_undo_id(id).unwrap()
}

#[test]
fn iteration_with_start_and_stop() {
    let (_, core) = sim_storage(writable());
    let mut tids = Vec::new();
    for i in 0..10u64 {
        let mut t = txn(
            i,
            vec![store(1, serial(&core, 1), &obj(&[], &format!("v{i}")))],
        );
        t.meta.extension = format!("ext{i}").into_bytes();
        tids.push(commit(&core, &t));
    }
    let collect = |start: Option<Tid>, stop: Option<Tid>| -> Vec<Tid> {
        let mut it = core.iterator(start, stop).unwrap();
        let mut out = Vec::new();
        while let Some((_, info)) = it.next_txn().unwrap() {
            out.push(info.tid);
        }
        out
    };
    assert_eq!(collect(None, None), tids);
    assert_eq!(collect(Some(tids[3]), None), tids[3..].to_vec());
    assert_eq!(collect(Some(tids[8]), Some(tids[9])), tids[8..].to_vec());
    assert_eq!(collect(None, Some(tids[2])), tids[..3].to_vec());
    assert_eq!(
        collect(Some(Tid(tids[3].0 + 1)), Some(Tid(tids[6].0 - 1))),
        tids[4..6].to_vec()
    );
    assert_eq!(collect(Some(tids[5]), Some(tids[4])), vec![]);
    assert_eq!(collect(Some(Tid(tids[9].0 + 1)), None), vec![]);
    assert_eq!(collect(Some(Tid(1)), Some(tids[0])), tids[..1].to_vec());
    for (i, &t) in tids.iter().enumerate() {
        assert_eq!(collect(Some(t), Some(t)), vec![t], "singleton {i}");
    }
    // An iterator sees the storage as it was when made.
    let mut it = core.iterator(None, None).unwrap();
    commit(
        &core,
        &txn(99, vec![store(2, Tid::ZERO, &obj(&[], "late"))]),
    );
    let mut n = 0;
    while let Some((t, info)) = it.next_txn().unwrap() {
        assert_eq!(info.extension, format!("ext{n}").into_bytes());
        let mut recs = RecordIter::new(it.view().clone(), t);
        let r = recs.next_record().unwrap().unwrap();
        assert_eq!(r.data.unwrap(), &obj(&[], &format!("v{n}"))[..]);
        assert!(recs.next_record().unwrap().is_none());
        n += 1;
    }
    assert_eq!(n, 10);
}

#[test]
fn record_iternext_walks_the_index() {
    let (_, core) = sim_storage(writable());
    assert!(matches!(
        core.record_iternext(None),
        Err(StorageError::Value(_))
    ));
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, &obj(&[], "0")),
                store(5, Tid::ZERO, &obj(&[], "5")),
                store(0x1_0000, Tid::ZERO, &obj(&[], "big")),
            ],
        ),
    );
    let r = core.record_iternext(None).unwrap();
    assert_eq!((r.oid, r.tid, r.next), (Oid(0), t1, Some(Oid(5))));
    let r = core.record_iternext(r.next).unwrap();
    assert_eq!((r.oid, r.next), (Oid(5), Some(Oid(0x1_0000))));
    let r = core.record_iternext(Some(Oid(6))).unwrap();
    assert_eq!(
        (r.oid, r.next, &r.data[..]),
        (Oid(0x1_0000), None, &obj(&[], "big")[..])
    );
}

#[test]
fn undo_is_disabled_while_packing() {
    let (_, core) = sim_storage(writable());
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, &obj(&[], "a"))]));
    let packing = core.start_packing().expect("no pack runs");
    let disabled = |e: StorageError| matches!(e, StorageError::Undo { ref reason, .. } if reason.contains("disabled for database maintenance"));
    assert!(disabled(core.undo_log(0, 10, None).unwrap_err()));
    assert!(disabled(core.vote(&txn(2, vec![undo(t1)])).unwrap_err()));
    // Other commits go on.
    commit(&core, &txn(3, vec![store(2, Tid::ZERO, &obj(&[], "b"))]));
    drop(packing);
    commit_changed(&core, &txn(4, vec![undo(t1)]));
}
