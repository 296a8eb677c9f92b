//! Pack with garbage collection, on real files.

use super::history::{commit_changed, obj, undo};
use super::*;
use crate::pack::{PackOptions, PackOutcome};
use crate::paths::sibling;
use crate::scan;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use zodb::StorageError;

fn open(path: &Path) -> FileStorageCore {
    FileStorageCore::open(
        path,
        Options {
            create: true,
            ..Options::default()
        },
    )
    .unwrap()
}

fn serial(core: &FileStorageCore, oid: u64) -> Tid {
    core.load(Oid(oid)).map(|l| l.1).unwrap_or(Tid::ZERO)
}

fn verify(path: &Path) -> scan::VerifySummary {
    let f = std::fs::File::open(path).unwrap();
    scan::verify(&f).unwrap()
}

fn packed(outcome: PackOutcome) -> crate::pack::PackStats {
    match outcome {
        PackOutcome::Packed(s) => s,
        other => panic!("expected a pack, got {other:?}"),
    }
}

fn now_tid() -> Tid {
    zodb::timestamp::new_tid(Tid::ZERO).unwrap()
}

/// root → 1 → 2; 3 unreferenced; several revisions of 1.
fn small_db(dir: &Path) -> (PathBuf, FileStorageCore) {
    let path = dir.join("Data.fs");
    let core = open(&path);
    commit(
        &core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, &obj(&[1], "root")),
                store(1, Tid::ZERO, &obj(&[2], "one v1")),
                store(2, Tid::ZERO, &obj(&[], "two")),
                store(3, Tid::ZERO, &obj(&[], "garbage")),
            ],
        ),
    );
    for v in 2..5 {
        commit(
            &core,
            &txn(
                v,
                vec![store(1, serial(&core, 1), &obj(&[2], &format!("one v{v}")))],
            ),
        );
    }
    (path, core)
}

#[test]
fn pack_now_keeps_only_reachable_current_revisions() {
    let dir = tempfile::tempdir().unwrap();
    let (path, core) = small_db(dir.path());
    let before = std::fs::read(&path).unwrap();
    let current: Vec<_> = (0..3).map(|o| core.load(Oid(o)).unwrap()).collect();
    let old_serial = core.history(Oid(1), 10).unwrap()[2].tid;
    let stats = packed(core.pack(now_tid(), PackOptions::default()).unwrap());
    assert_eq!((stats.objects_before, stats.objects_after), (4, 3));
    assert!(stats.new_size < stats.old_size);
    for (o, want) in (0..3).zip(&current) {
        assert_eq!(core.load(Oid(o)).unwrap(), *want);
    }
    assert!(matches!(core.load(Oid(3)), Err(StorageError::PosKey(_))));
    assert!(matches!(
        core.load_serial(Oid(1), old_serial),
        Err(StorageError::PosKey(_))
    ));
    assert_eq!(core.history(Oid(1), 10).unwrap().len(), 1);
    // Nothing before the pack can be undone.
    assert!(core.undo_log(0, 100, None).unwrap().is_empty());
    // Data.fs.old is the file as it was; the new one is valid and its index was saved.
    assert_eq!(std::fs::read(sibling(&path, ".old")).unwrap(), before);
    let v = verify(&path);
    core.with_index(|i| assert_eq!(&v.index, i));
    assert!(!sibling(&path, ".pack").exists());
    // Commits go on, new oids do not reuse collected ones while open.
    let t = commit(
        &core,
        &txn(9, vec![store(1, serial(&core, 1), &obj(&[2], "after"))]),
    );
    assert!(core.new_oids(1).unwrap()[0] > Oid(3));
    core.close().unwrap();
    let reopened = open(&path);
    assert!(reopened.used_index());
    assert_eq!(reopened.load(Oid(1)).unwrap().1, t);
    assert_eq!(reopened.len(), 3);
}

#[test]
fn history_after_the_pack_time_is_kept_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (path, core) = small_db(dir.path());
    let pack_time = core.last_transaction();
    // After the pack time: changes, an undo (back pointer into the packed part), a
    // creation and its undo, a deletion.
    let t5 = commit(
        &core,
        &txn(5, vec![store(1, serial(&core, 1), &obj(&[2], "v5"))]),
    );
    let (t6, _) = commit_changed(&core, &txn(6, vec![undo(t5)]));
    let t7 = commit(
        &core,
        &txn(
            7,
            vec![
                store(0, serial(&core, 0), &obj(&[1, 4], "root2")),
                store(4, Tid::ZERO, &obj(&[], "four")),
            ],
        ),
    );
    commit_changed(&core, &txn(8, vec![undo(t7)]));
    // Everything observable as of times after the pack time must not change, for every
    // object but the garbage (3).
    let oids = [0u64, 1, 2, 4];
    let mut expected_after = Vec::new();
    for &o in &oids {
        for at in [t6, t7, Tid(t7.0 + 1), Tid::MAX] {
            expected_after.push((o, at, core.load_before(Oid(o), at).map(|l| l.revision).ok()));
        }
    }
    let undo_log: Vec<Tid> = core
        .undo_log(0, 100, None)
        .unwrap()
        .iter()
        .map(|e| e.tid)
        .collect();
    packed(core.pack(pack_time, PackOptions::default()).unwrap());
    for (o, at, expected) in expected_after {
        let got = core.load_before(Oid(o), at).map(|l| l.revision).ok();
        assert_eq!(got, expected, "oid {o} before {at}");
    }
    assert!(matches!(core.load(Oid(3)), Err(StorageError::PosKey(_))));
    // Transactions after the pack time can still be undone; the undo log ends at the pack.
    let after: Vec<Tid> = core
        .undo_log(0, 100, None)
        .unwrap()
        .iter()
        .map(|e| e.tid)
        .collect();
    assert_eq!(after, undo_log[..4].to_vec());
    assert_eq!(t6, after[2]);
    commit_changed(&core, &txn(9, vec![undo(t6)]));
    assert_eq!(&core.load(Oid(1)).unwrap().0[..], &obj(&[2], "v5")[..]);
    // The undo record kept its back pointer, rewritten.
    let mut it = core.iterator(Some(t6), Some(t6)).unwrap();
    let (t, _) = it.next_txn().unwrap().unwrap();
    let r = crate::iter::RecordIter::new(core.view(), t)
        .next_record()
        .unwrap()
        .unwrap();
    assert!(r.data_txn.is_some());
    verify(&path);
    // Packing again to the same time: nothing to do.
    assert!(matches!(
        core.pack(pack_time, PackOptions::default()).unwrap(),
        PackOutcome::Unchanged(_)
    ));
}

#[test]
fn redundant_empty_and_bad_packs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Data.fs");
    let core = open(&path);
    assert!(matches!(
        core.pack(now_tid(), PackOptions::default()).unwrap(),
        PackOutcome::Unchanged(_)
    ));
    let t1 = commit(&core, &txn(1, vec![store(0, Tid::ZERO, &obj(&[], "root"))]));
    // Packing to before anything existed, or with nothing to remove, changes nothing.
    assert!(matches!(
        core.pack(Tid(1), PackOptions::default()).unwrap(),
        PackOutcome::Unchanged(_)
    ));
    assert!(matches!(
        core.pack(Tid::ZERO, PackOptions::default()),
        Err(StorageError::Value(_))
    ));
    let t2 = commit(&core, &txn(2, vec![store(0, t1, &obj(&[], "root2"))]));
    packed(core.pack(t2, PackOptions::default()).unwrap());
    // An earlier pack time after a later pack is redundant (Python's RedundantPackWarning).
    let t3 = commit(&core, &txn(3, vec![store(0, t2, &obj(&[], "root3"))]));
    assert!(matches!(
        core.pack(t1, PackOptions::default()).unwrap(),
        PackOutcome::Unchanged(_)
    ));
    assert_eq!(core.load(Oid(0)).unwrap().1, t3);

    // A dangling reference fails the pack and leaves the file alone, as in Python.
    let t4 = commit(&core, &txn(4, vec![store(0, t3, &obj(&[77], "dangling"))]));
    let size = std::fs::metadata(&path).unwrap().len();
    commit(&core, &txn(5, vec![store(0, t4, &obj(&[], "fixed"))]));
    assert!(matches!(
        core.pack(t4, PackOptions::default()),
        Err(StorageError::PosKey(Oid(77)))
    ));
    assert!(!sibling(&path, ".pack").exists());
    assert!(std::fs::metadata(&path).unwrap().len() > size);
    // Without GC the same pack works.
    packed(core.pack(t4, PackOptions::gc(false)).unwrap());
    verify(&path);

    // Read-only storages cannot pack.
    core.close().unwrap();
    let ro = FileStorageCore::open(&path, read_only()).unwrap();
    assert!(matches!(
        ro.pack(now_tid(), PackOptions::default()),
        Err(StorageError::ReadOnly)
    ));
}

#[test]
fn commits_and_loads_continue_during_pack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Data.fs");
    let core = Arc::new(open(&path));
    // A database worth packing: a root referencing 200 objects with 20 revisions each.
    let refs: Vec<u64> = (1..=200).collect();
    commit(
        &core,
        &txn(0, vec![store(0, Tid::ZERO, &obj(&refs, "root"))]),
    );
    for round in 0..20u64 {
        let ops = (1..=200u64)
            .map(|o| {
                store(
                    o,
                    serial(&core, o),
                    &obj(&[], &format!("{o} r{round} {}", "x".repeat(200))),
                )
            })
            .collect();
        commit(&core, &txn(round + 1, ops));
    }
    let pack_time = core.last_transaction();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (core, stop) = (core.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) || n < 20 {
                let o = 1 + n % 200;
                let t = txn(
                    1000 + n,
                    vec![store(o, serial(&core, o), &obj(&[], &format!("late {n}")))],
                );
                match core.vote(&t).unwrap() {
                    Vote::Ok { .. } => {
                        std::thread::yield_now();
                        core.finish(t.key).unwrap();
                    }
                    Vote::Conflicts(c) => panic!("{c:?}"),
                }
                n += 1;
            }
            n
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (core, stop) = (core.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut loads = 0;
                while !stop.load(Ordering::Relaxed) {
                    for o in 0..=200u64 {
                        let (data, tid) = core.load(Oid(o)).unwrap();
                        assert_eq!(core.load_serial(Oid(o), tid).unwrap(), data);
                        loads += 1;
                    }
                }
                loads
            })
        })
        .collect();
    packed(core.pack(pack_time, PackOptions::default()).unwrap());
    for _ in 0..3 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Later pack times while the writer goes on.
        core.pack(core.last_transaction(), PackOptions::default())
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    // Every late commit is there: the last one of each object is current.
    for k in n.saturating_sub(200)..n {
        let o = 1 + k % 200;
        assert_eq!(
            &core.load(Oid(o)).unwrap().0[..],
            &obj(&[], &format!("late {k}"))[..]
        );
    }
    let v = verify(&path);
    core.with_index(|i| assert_eq!(&v.index, i));
    assert_eq!(v.last_tid, core.last_transaction());
}

/// ZODB's `testPackAfterUndoManyTimes`: undos flip the root between two revisions, one of
/// which references an object created just before; packing at each point keeps it.
#[test]
fn pack_after_undo_many_times() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("Data.fs");
    let core = open(&path);
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, &obj(&[1], "r1")),
                store(1, Tid::ZERO, &obj(&[], "one")),
            ],
        ),
    );
    let t2 = commit(
        &core,
        &txn(
            2,
            vec![
                store(0, t1, &obj(&[1, 2], "r2")),
                store(2, Tid::ZERO, &obj(&[], "two")),
            ],
        ),
    );
    commit(
        &core,
        &txn(
            3,
            vec![
                store(0, t2, &obj(&[3, 2], "r3")),
                store(3, Tid::ZERO, &obj(&[], "three")),
            ],
        ),
    );
    let mut pack_times = Vec::new();
    for i in 0..10u64 {
        let last = core.undo_log(0, 1, None).unwrap()[0].tid;
        commit_changed(&core, &txn(10 + i, vec![undo(last)]));
        let expect = if i % 2 == 0 { "r2" } else { "r3" };
        assert_eq!(
            &core.load(Oid(0)).unwrap().0[..],
            &obj(if i % 2 == 0 { &[1, 2] } else { &[3, 2] }, expect)[..]
        );
        pack_times.push(core.last_transaction());
    }
    for t in pack_times {
        // The first packs keep oid 3's creation only for the undos after the pack time.
        core.pack(t, PackOptions::default()).unwrap();
        assert_eq!(&core.load(Oid(0)).unwrap().0[..], &obj(&[3, 2], "r3")[..]);
        assert_eq!(&core.load(Oid(3)).unwrap().0[..], &obj(&[], "three")[..]);
        verify(&path);
    }
}
