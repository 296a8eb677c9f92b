use super::*;
use crate::format::{self, Payload};
use crate::scan;
use crate::FileStorage;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Weak;
use zodb::{Conflict, InvalidationSink, Storage, StorageError, TxnKey};

const T1: Tid = Tid(0x03f5_9458_1777_7777);
const T2: Tid = Tid(0x03f5_9458_1777_7778);

fn spec_root_state() -> &'static [u8] {
    &SPEC_FS[0x108..0x15e]
}

#[test]
fn spec_example_loads() {
    let (_, core) = reopen(SPEC_FS.to_vec(), read_only());
    assert_eq!(core.last_transaction(), T2);
    assert_eq!(core.len(), 2);
    assert_eq!(core.size(), 474);
    let (data, serial) = core.load(Oid(0)).unwrap();
    assert_eq!((&data[..], serial), (spec_root_state(), T2));
    let (data, serial) = core.load(Oid(1)).unwrap();
    assert_eq!((&data[..], serial), (&SPEC_FS[0x188..0x1d2], T2));
    // The root's first revision, from T1.
    let lb = core.load_before(Oid(0), T2).unwrap();
    assert_eq!(lb.snapshot, T2);
    let rev = lb.revision.unwrap();
    assert_eq!((rev.start, rev.end), (T1, Some(T2)));
    assert_eq!(&rev.data[..], &SPEC_FS[0x5e..0x9e]);
    assert_eq!(core.load_before(Oid(1), T2).unwrap().revision, None);
    let h = core.history(Oid(0), 10).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(
        (h[0].tid, &h[0].user[..], &h[0].description[..]),
        (T2, &b"admin"[..], &b"add x"[..])
    );
    assert_eq!(&h[0].extension[..], &SPEC_FS[0xc7..0xde]);
    assert_eq!(h[0].size, 86);
    assert_eq!(
        (h[1].tid, &h[1].description[..], h[1].size),
        (T1, &b"initial database creation"[..], 64)
    );
    assert!(h[1].user.is_empty() && h[1].extension.is_empty());
    assert_eq!(core.history(Oid(0), 1).unwrap().len(), 1);
    assert!(matches!(
        core.load(Oid(2)),
        Err(StorageError::PosKey(Oid(2)))
    ));
    assert_eq!(core.load_serial(Oid(0), T1).unwrap(), &SPEC_FS[0x5e..0x9e]);
    assert!(matches!(
        core.load_serial(Oid(1), T1),
        Err(StorageError::PosKey(_))
    ));
    assert_eq!(
        core.recent_transactions(10).unwrap(),
        vec![(T1, vec![Oid(0)]), (T2, vec![Oid(0), Oid(1)])]
    );
}

#[test]
fn spec_example_index_is_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("Data.fs");
    std::fs::write(&p, SPEC_FS).unwrap();
    // No .index: a full scan, then the index is saved as Python would.
    let core = FileStorageCore::open(&p, writable()).unwrap();
    assert!(!core.used_index());
    assert_eq!(
        std::fs::read(dir.path().join("Data.fs.index")).unwrap(),
        SPEC_INDEX
    );
    core.close().unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("Data.fs.index")).unwrap(),
        SPEC_INDEX
    );
    let core = FileStorageCore::open(&p, read_only()).unwrap();
    assert!(core.used_index());
    assert_eq!(core.load(Oid(1)).unwrap().1, T2);
}

#[test]
fn tids_strictly_increase_and_are_persisted() {
    let (sim, core) = sim_storage(writable());
    let mut last = Tid::ZERO;
    for i in 0..50u64 {
        let tid = commit(
            &core,
            &txn(
                i,
                vec![store(
                    i % 3,
                    core.load(Oid(i % 3)).map(|l| l.1).unwrap_or(Tid::ZERO),
                    b"x",
                )],
            ),
        );
        assert!(tid > last);
        assert_eq!(core.last_transaction(), tid);
        last = tid;
    }
    let v = scan::verify(&*sim).unwrap();
    assert_eq!((v.transactions, v.last_tid), (50, last));
    // A voted then aborted tid is not reused.
    let t = txn(100, vec![store(7, Tid::ZERO, b"y")]);
    core.vote(&t).unwrap();
    let size = sim.contents().len();
    core.abort(100);
    assert_eq!(sim.contents().len() as u64, core.size());
    assert!(size as u64 > core.size());
    let t2 = txn(101, vec![store(7, Tid::ZERO, b"y")]);
    core.vote(&t2).unwrap();
    let staged_tid = Tid(u64::from_be_bytes(
        sim.contents()[usize::try_from(core.size()).unwrap()..][..8]
            .try_into()
            .unwrap(),
    ));
    assert!(staged_tid > last);
    let tid = core.finish(101).unwrap();
    assert_eq!(tid, staged_tid);
}

#[test]
fn conflicts_are_reported_and_nothing_is_written() {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![store(0, Tid::ZERO, b"root"), store(1, Tid::ZERO, b"a1")],
        ),
    );
    let t2 = commit(&core, &txn(2, vec![store(1, t1, b"a2")]));
    let before = sim.contents();
    // Stale serial on oid 1; oid 0 is current; oid 5 is new (never checked).
    let t = txn(
        3,
        vec![
            store(1, t1, b"mine"),
            store(0, t1, b"root2"),
            store(5, Tid(42), b"new"),
        ],
    );
    match core.vote(&t).unwrap() {
        Vote::Conflicts(c) => assert_eq!(
            c,
            vec![Conflict {
                oid: Oid(1),
                committed: t2,
                read: t1,
                data: Bytes::from_static(b"mine")
            }]
        ),
        v => panic!("{v:?}"),
    }
    assert_eq!(sim.contents(), before);
    // The client resolves and re-stores with the committed serial: the same buffer plus
    // the resolved store clears the conflict.
    let mut ops = t.ops.clone();
    ops.push(store(1, t2, b"resolved"));
    let t3 = commit(&core, &txn(3, ops));
    assert_eq!(
        core.load(Oid(1)).unwrap(),
        (Bytes::from_static(b"resolved"), t3)
    );
    assert_eq!(core.load(Oid(5)).unwrap().0, &b"new"[..]);
    // One record per oid.
    assert_eq!(
        core.recent_transactions(1).unwrap(),
        vec![(t3, vec![Oid(1), Oid(0), Oid(5)])]
    );
    scan::verify(&*sim).unwrap();
}

#[test]
fn read_conflicts_and_deletes() {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![store(0, Tid::ZERO, b"root"), store(1, Tid::ZERO, b"a")],
        ),
    );
    let e = core.vote(&txn(
        2,
        vec![
            store(0, t1, b"r2"),
            TxnOp::CheckCurrent {
                oid: Oid(1),
                serial: Tid(5),
            },
        ],
    ));
    assert!(
        matches!(e, Err(StorageError::ReadConflict { oid: Oid(1), committed, read: Tid(5) }) if committed == t1)
    );
    // Nothing staged after an error: a new vote works.
    let t2 = commit(
        &core,
        &txn(
            3,
            vec![
                TxnOp::CheckCurrent {
                    oid: Oid(1),
                    serial: t1,
                },
                store(0, t1, b"r2"),
            ],
        ),
    );
    assert!(matches!(
        core.vote(&txn(
            4,
            vec![TxnOp::Delete {
                oid: Oid(9),
                serial: Tid::ZERO
            }]
        )),
        Err(StorageError::PosKey(Oid(9)))
    ));
    assert!(matches!(
        core.vote(&txn(5, vec![TxnOp::Delete { oid: Oid(0), serial: t1 }])),
        Err(StorageError::Conflict { oid: Oid(0), committed, read, .. }) if committed == t2 && read == t1
    ));
    let t3 = commit(
        &core,
        &txn(
            6,
            vec![TxnOp::Delete {
                oid: Oid(1),
                serial: t1,
            }],
        ),
    );
    assert!(matches!(
        core.load(Oid(1)),
        Err(StorageError::PosKey(Oid(1)))
    ));
    assert!(matches!(core.get_tid(Oid(1)), Err(StorageError::PosKey(_))));
    assert_eq!(core.len(), 2, "deleted objects still count");
    let h = core.history(Oid(1), 5).unwrap();
    assert_eq!((h.len(), h[0].tid, h[0].size, h[1].tid), (2, t3, 0, t1));
    // A check against a deleted object compares with the deletion's tid.
    assert!(matches!(
        core.vote(&txn(
            7,
            vec![TxnOp::CheckCurrent {
                oid: Oid(1),
                serial: t1
            }]
        )),
        Err(StorageError::ReadConflict { .. })
    ));
    scan::verify(&*sim).unwrap();
}

/// docs/filestorage.md §3.5's verified example: created in T4, "uncreated" in T6.
#[test]
fn load_before_semantics() {
    let (_, core) = sim_storage(writable());
    let _t1 = commit(&core, &txn(1, vec![store(0, Tid::ZERO, b"root")]));
    let t2 = commit(&core, &txn(2, vec![store(1, Tid::ZERO, b"other")]));
    let _t3 = commit(&core, &txn(3, vec![store(1, t2, b"other2")]));
    let t4 = commit(&core, &txn(4, vec![store(7, Tid::ZERO, b"x4")]));
    let _t5 = commit(&core, &txn(5, vec![store(1, _t3, b"other3")]));
    let t6 = commit(
        &core,
        &txn(
            6,
            vec![TxnOp::Delete {
                oid: Oid(7),
                serial: t4,
            }],
        ),
    );
    let x = Oid(7);
    assert_eq!(core.load_before(x, t4).unwrap().revision, None);
    let t5 = _t5;
    for before in [Tid(t4.0 + 1), t5, t6] {
        let r = core.load_before(x, before).unwrap().revision.unwrap();
        assert_eq!(
            (&r.data[..], r.start, r.end),
            (&b"x4"[..], t4, Some(t6)),
            "before {before:?}"
        );
    }
    assert!(matches!(
        core.load_before(x, Tid(t6.0 + 1)),
        Err(StorageError::PosKey(_))
    ));
    assert!(matches!(
        core.load_before(x, Tid::MAX),
        Err(StorageError::PosKey(_))
    ));
    assert!(matches!(
        core.load_before(Oid(99), Tid::MAX),
        Err(StorageError::PosKey(Oid(99)))
    ));
    let cur = core.load_before(Oid(1), Tid::MAX).unwrap();
    assert_eq!(cur.snapshot, t6);
    let r = cur.revision.unwrap();
    assert_eq!((&r.data[..], r.start, r.end), (&b"other3"[..], t5, None));
    assert_eq!(core.load_serial(x, t4).unwrap(), &b"x4"[..]);
    assert!(matches!(
        core.load_serial(x, t6),
        Err(StorageError::PosKey(_))
    ));
}

/// Back pointers (as undo and Python restores write them): data from the older record,
/// serial from the record holding the pointer.
#[test]
fn back_pointers_are_followed() {
    // Append transactions holding one back-pointer record for oid 1; returns its position.
    fn append(f: &mut Vec<u8>, tid: Tid, prev: u64, back: u64) -> u64 {
        let pos = f.len() as u64;
        let mut body = Vec::new();
        format::write_data_record(&mut body, Oid(1), tid, prev, pos, Payload::Back(back));
        let tlen = 23 + body.len() as u64;
        format::write_txn_header(f, tid, tlen, b' ', b"", b"", b"");
        f.extend_from_slice(&body);
        f.extend_from_slice(&tlen.to_be_bytes());
        pos + 23
    }
    let t3 = Tid(T2.0 + 1);
    let t4 = Tid(T2.0 + 2);
    let mut f = SPEC_FS.to_vec();
    // T3: back to oid 1's T2 record (350); T4: back to T3's record, which is itself one.
    let r3 = append(&mut f, t3, 350, 350);
    append(&mut f, t4, r3, r3);
    let sim = SimFile::with_contents(f);
    scan::verify(&sim).unwrap();
    let (_, core) = reopen(sim.contents(), read_only());
    let oid1 = &SPEC_FS[0x188..0x1d2];
    assert_eq!(
        core.load(Oid(1)).unwrap(),
        (Bytes::copy_from_slice(oid1), t4)
    );
    let r = core.load_before(Oid(1), t4).unwrap().revision.unwrap();
    assert_eq!((&r.data[..], r.start, r.end), (oid1, t3, Some(t4)));
    assert_eq!(core.load_serial(Oid(1), t3).unwrap(), oid1);
    let h = core.history(Oid(1), 10).unwrap();
    assert_eq!(
        h.iter().map(|h| (h.tid, h.size)).collect::<Vec<_>>(),
        vec![(t4, 0), (t3, 0), (T2, 74)]
    );
}

#[test]
fn new_oids_continue_from_the_max() {
    let (_, core) = reopen(SPEC_FS.to_vec(), writable());
    assert_eq!(core.new_oids(3).unwrap(), vec![Oid(2), Oid(3), Oid(4)]);
    // A store of a higher oid raises the max.
    let t = commit(&core, &txn(1, vec![store(0x1_0000, Tid::ZERO, b"far")]));
    assert!(t > T2);
    assert_eq!(core.new_oids(1).unwrap(), vec![Oid(0x1_0001)]);
    let (_, ro) = reopen(SPEC_FS.to_vec(), read_only());
    assert!(matches!(ro.new_oids(1), Err(StorageError::ReadOnly)));
    assert!(matches!(
        ro.vote(&txn(1, vec![])),
        Err(StorageError::ReadOnly)
    ));
    let (_, empty) = sim_storage(writable());
    assert_eq!(empty.new_oids(2).unwrap(), vec![Oid(1), Oid(2)]);
}

#[test]
fn explicit_tids_and_restore() {
    let (sim, core) = reopen(SPEC_FS.to_vec(), writable());
    let mut t = txn(1, vec![]);
    t.meta.tid = Some(T2);
    assert!(matches!(core.vote(&t), Err(StorageError::Value(_))));
    let t3 = Tid(T2.0 + 100);
    t.meta.tid = Some(t3);
    t.meta.status = b'p';
    t.ops = vec![
        TxnOp::Restore {
            oid: Oid(5),
            serial: t3,
            data: Some(Bytes::from_static(b"restored")),
            prev_txn: None,
        },
        TxnOp::Restore {
            oid: Oid(1),
            serial: t3,
            data: None,
            prev_txn: Some(T2),
        },
    ];
    let (sink, _) = Recorder::new(None);
    core.attach(sink.clone());
    assert_eq!(commit(&core, &t), t3);
    assert_eq!(
        sink.calls.lock().clone(),
        vec![(t3, vec![], Some(1))],
        "restores are not invalidated"
    );
    assert_eq!(
        core.load(Oid(5)).unwrap(),
        (Bytes::from_static(b"restored"), t3)
    );
    assert!(matches!(core.load(Oid(1)), Err(StorageError::PosKey(_))));
    assert_eq!(sim.contents()[474 + 16], b'p');
    scan::verify(&*sim).unwrap();
    // Empty pickles cannot be written: they would read as back pointers.
    assert!(matches!(
        core.vote(&txn(2, vec![store(9, Tid::ZERO, b"")])),
        Err(StorageError::Value(_))
    ));
}

#[test]
fn transaction_protocol_misuse() {
    let (sim, core) = sim_storage(writable());
    assert!(matches!(core.finish(1), Err(StorageError::Transaction(_))));
    core.abort(1); // harmless
    core.vote(&txn(1, vec![store(0, Tid::ZERO, b"a")])).unwrap();
    assert!(matches!(
        core.vote(&txn(2, vec![])),
        Err(StorageError::Transaction(_))
    ));
    assert!(matches!(core.finish(2), Err(StorageError::Transaction(_))));
    core.abort(2); // not the staged one: ignored
    let t = core.finish(1).unwrap();
    assert_eq!(core.last_transaction(), t);
    // Empty transactions are legal.
    let mut e = txn(3, vec![]);
    e.meta.user = b"u".to_vec();
    e.meta.description = "d\u{e9}".as_bytes().to_vec();
    e.meta.extension = b"\x80\x03}q\x00.".to_vec();
    let te = commit(&core, &e);
    assert_eq!(
        core.recent_transactions(5).unwrap(),
        vec![(t, vec![Oid(0)]), (te, vec![])]
    );
    scan::verify(&*sim).unwrap();
}

#[test]
fn write_and_fsync_failures_leave_a_usable_storage() {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(&core, &txn(1, vec![store(0, Tid::ZERO, b"a")]));
    sim.set_fail_writes(true);
    assert!(matches!(
        core.vote(&txn(2, vec![store(0, t1, b"b")])),
        Err(StorageError::Io(_))
    ));
    sim.set_fail_writes(false);
    assert_eq!(sim.contents().len() as u64, core.size());
    // Vote works, then fsync fails at finish: the transaction is dropped.
    core.vote(&txn(3, vec![store(0, t1, b"b")])).unwrap();
    sim.set_fail_writes(true);
    assert!(matches!(core.finish(3), Err(StorageError::Io(_))));
    sim.set_fail_writes(false);
    assert_eq!(core.last_transaction(), t1);
    assert_eq!(core.load(Oid(0)).unwrap().0, &b"a"[..]);
    assert_eq!(sim.contents().len() as u64, core.size());
    let t4 = commit(&core, &txn(4, vec![store(0, t1, b"c")]));
    assert_eq!(core.load(Oid(0)).unwrap(), (Bytes::from_static(b"c"), t4));
    scan::verify(&*sim).unwrap();
}

/// Records what the sink is told and what a load sees at that moment.
struct Recorder {
    core: Mutex<Option<Weak<FileStorageCore>>>,
    #[allow(clippy::type_complexity)]
    calls: Mutex<Vec<(Tid, Vec<Oid>, Option<TxnKey>)>>,
    seen: Mutex<Vec<(Tid, Option<Bytes>)>>,
}

impl Recorder {
    fn new(core: Option<&Arc<FileStorageCore>>) -> (Arc<Recorder>, ()) {
        (
            Arc::new(Recorder {
                core: Mutex::new(core.map(Arc::downgrade)),
                calls: Mutex::new(Vec::new()),
                seen: Mutex::new(Vec::new()),
            }),
            (),
        )
    }
}

impl InvalidationSink for Recorder {
    fn invalidate(&self, tid: Tid, oids: &[Oid], committer: Option<TxnKey>) {
        self.calls.lock().push((tid, oids.to_vec(), committer));
        if let Some(core) = self.core.lock().as_ref().and_then(Weak::upgrade) {
            let seen = match core.load_before(Oid(0), Tid::MAX) {
                Ok(lb) => (lb.snapshot, lb.revision.map(|r| r.data)),
                Err(StorageError::PosKey(_)) => (core.last_transaction(), None),
                Err(e) => panic!("{e}"),
            };
            self.seen.lock().push(seen);
            assert!(core.last_transaction() < tid);
        }
    }
}

#[test]
fn sink_is_told_before_loads_see_the_commit() {
    let (_, core) = sim_storage(writable());
    let core = Arc::new(core);
    let (sink, _) = Recorder::new(Some(&core));
    core.attach(sink.clone());
    let t1 = commit(&core, &txn(1, vec![store(0, Tid::ZERO, b"a")]));
    let t2 = commit(
        &core,
        &txn(
            2,
            vec![
                store(1, Tid::ZERO, b"x"),
                store(0, t1, b"b"),
                store(1, Tid::ZERO, b"y"),
            ],
        ),
    );
    assert_eq!(
        sink.calls.lock().clone(),
        vec![
            (t1, vec![Oid(0)], Some(1)),
            (t2, vec![Oid(1), Oid(0), Oid(1)], Some(2))
        ]
    );
    // During the sink call for t2, loads still saw t1's state, with snapshot t1.
    let seen = sink.seen.lock().clone();
    assert_eq!(
        seen,
        vec![(Tid::ZERO, None), (t1, Some(Bytes::from_static(b"a")))]
    );
    assert_eq!(core.load(Oid(1)).unwrap().0, &b"y"[..]);
}

#[test]
fn invalidations_since_and_recent_transactions() {
    let (_, core) = sim_storage(writable());
    assert_eq!(
        core.invalidations_since(Tid::ZERO).unwrap(),
        Some((Tid::ZERO, vec![]))
    );
    assert!(core.recent_transactions(5).unwrap().is_empty());
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![store(0, Tid::ZERO, b"a"), store(1, Tid::ZERO, b"a")],
        ),
    );
    let t2 = commit(
        &core,
        &txn(2, vec![store(1, t1, b"b"), store(2, Tid::ZERO, b"b")]),
    );
    let t3 = commit(&core, &txn(3, vec![store(2, t2, b"c"), store(0, t1, b"c")]));
    assert_eq!(core.invalidations_since(t3).unwrap(), Some((t3, vec![])));
    assert_eq!(
        core.invalidations_since(Tid(t3.0 + 5)).unwrap(),
        Some((t3, vec![]))
    );
    assert_eq!(
        core.invalidations_since(t2).unwrap(),
        Some((t3, vec![Oid(2), Oid(0)]))
    );
    assert_eq!(
        core.invalidations_since(Tid(t1.0 + 1)).unwrap(),
        Some((t3, vec![Oid(1), Oid(2), Oid(0)]))
    );
    assert_eq!(
        core.invalidations_since(t1).unwrap(),
        Some((t3, vec![Oid(1), Oid(2), Oid(0)]))
    );
    assert_eq!(core.invalidations_since(Tid(t1.0 - 1)).unwrap(), None);
    assert_eq!(
        core.recent_transactions(2).unwrap(),
        vec![(t2, vec![Oid(1), Oid(2)]), (t3, vec![Oid(2), Oid(0)])]
    );
    assert_eq!(core.recent_transactions(100).unwrap().len(), 3);
}

#[test]
fn lock_file_excludes_a_second_writer_but_not_readers() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("Data.fs");
    assert!(
        FileStorageCore::open(&p, writable()).is_err(),
        "missing file without create"
    );
    let a = FileStorageCore::open(
        &p,
        Options {
            create: true,
            ..writable()
        },
    )
    .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"FS30");
    let e = FileStorageCore::open(&p, writable()).unwrap_err();
    assert!(e.to_string().contains("locked"), "{e}");
    let r = FileStorageCore::open(&p, read_only()).unwrap();
    assert_eq!(r.last_transaction(), Tid::ZERO);
    // (Python's sanity check ignores indexes of files under 100 bytes.)
    let t = commit(&a, &txn(1, vec![store(0, Tid::ZERO, &[7u8; 100])]));
    a.close().unwrap();
    assert!(matches!(
        a.vote(&txn(2, vec![])),
        Err(StorageError::Transaction(_))
    ));
    let b = FileStorageCore::open(&p, writable()).unwrap();
    assert!(b.used_index());
    assert_eq!(b.load(Oid(0)).unwrap().1, t);
    assert!(FileStorageCore::open(
        &p,
        Options {
            create: true,
            read_only: true,
            ..Options::default()
        }
    )
    .is_err());
}

#[test]
fn zero_byte_and_bad_magic_files() {
    let (sim, core) = reopen(Vec::new(), writable());
    assert_eq!(sim.contents(), b"FS30");
    assert_eq!(core.size(), 4);
    let (sim, core) = reopen(Vec::new(), read_only());
    assert!(sim.contents().is_empty());
    assert_eq!(core.last_transaction(), Tid::ZERO);
    for bad in [&b"FS"[..], b"XXXX", b"FS31\0\0\0"] {
        let sim = Arc::new(SimFile::with_contents(bad.to_vec()));
        let e = FileStorageCore::open_io(sim, "bad", read_only()).unwrap_err();
        assert!(matches!(e, StorageError::Corrupted(_)), "{e}");
    }
}

#[test]
fn fs21_is_read_only() {
    let mut f = SPEC_FS.to_vec();
    f[..4].copy_from_slice(b"FS21");
    let sim = Arc::new(SimFile::with_contents(f.clone()));
    let e = FileStorageCore::open_io(sim, "old", writable()).unwrap_err();
    assert!(e.to_string().contains("FS21"), "{e}");
    let (_, core) = reopen(f, read_only());
    assert_eq!(core.magic(), crate::format::Magic::Fs21);
    assert_eq!(core.load(Oid(1)).unwrap().1, T2);
}

fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn index_file_is_used_checked_and_extended() {
    let dir = tempfile::tempdir().unwrap();
    let p = write_file(dir.path(), "Data.fs", SPEC_FS);
    let core = FileStorageCore::open(&p, writable()).unwrap();
    let t3 = commit(&core, &txn(1, vec![store(1, T2, b"new")]));
    core.close().unwrap();
    let idx = std::fs::read(dir.path().join("Data.fs.index")).unwrap();
    let (pos, _) = crate::index_file::parse(&idx).unwrap();
    assert_eq!(pos, std::fs::metadata(&p).unwrap().len());

    // A stale index (saved before the last commit) is used and the scan continues.
    write_file(dir.path(), "Data.fs.index", SPEC_INDEX);
    let core = FileStorageCore::open(&p, read_only()).unwrap();
    assert!(core.used_index());
    assert_eq!(core.load(Oid(1)).unwrap(), (Bytes::from_static(b"new"), t3));

    // An index that does not match the file is ignored (here: positions of another file).
    let mut wrong = crate::index::Index::new();
    wrong.insert(Oid(0), 222);
    wrong.insert(Oid(1), 350 + 1);
    std::fs::write(
        dir.path().join("Data.fs.index"),
        crate::index_file::serialize(&wrong, 474),
    )
    .unwrap();
    let core = FileStorageCore::open(&p, read_only()).unwrap();
    assert!(!core.used_index());
    assert_eq!(core.load(Oid(1)).unwrap().1, t3);

    // A damaged index is ignored, and rebuilt by a writable open.
    std::fs::write(dir.path().join("Data.fs.index"), &idx[..idx.len() - 3]).unwrap();
    let core = FileStorageCore::open(&p, writable()).unwrap();
    assert!(!core.used_index());
    assert_eq!(
        std::fs::read(dir.path().join("Data.fs.index")).unwrap(),
        idx
    );
    assert!(!dir.path().join("Data.fs.index.index_tmp").exists());
}

#[test]
fn a_large_index_loads_fast() {
    let mut index = crate::index::Index::new();
    for i in 0..1_000_000u64 {
        index.insert(Oid(i), 4 + i * 100);
    }
    let bytes = crate::index_file::serialize(&index, 4 + 1_000_000 * 100);
    let start = std::time::Instant::now();
    let (pos, back) = crate::index_file::parse(&bytes).unwrap();
    let took = start.elapsed();
    assert_eq!(pos, 100_000_004);
    assert_eq!(back.len(), 1_000_000);
    assert_eq!(back.get(Oid(999_999)), Some(4 + 999_999 * 100));
    // Generous for unoptimised test builds; release builds take a few milliseconds.
    assert!(took < std::time::Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn async_trait_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("Data.fs");
    let fs = FileStorage::open(
        &p,
        Options {
            create: true,
            ..Options::default()
        },
    )
    .unwrap();
    let s: Arc<dyn Storage> = Arc::new(fs.clone());
    let oids = s.new_oids(2).await.unwrap();
    assert_eq!(oids, vec![Oid(1), Oid(2)]);
    let t = txn(
        9,
        vec![store(0, Tid::ZERO, b"root"), store(1, Tid::ZERO, b"one")],
    );
    assert_eq!(s.vote(&t).await.unwrap(), Vote::Ok { changed: vec![] });
    let tid = s.finish(9).await.unwrap();
    assert_eq!(s.last_transaction(), tid);
    let lb = s.load_before(Oid(1), Tid::MAX).await.unwrap();
    assert_eq!(lb.revision.unwrap().data, &b"one"[..]);
    assert_eq!(s.load_serial(Oid(0), tid).await.unwrap(), &b"root"[..]);
    assert_eq!(s.history(Oid(0), 5).await.unwrap().len(), 1);
    assert_eq!(
        s.recent_transactions(5).await.unwrap(),
        vec![(tid, vec![Oid(0), Oid(1)])]
    );
    assert_eq!(
        s.invalidations_since(tid).await.unwrap(),
        Some((tid, vec![]))
    );
    assert_eq!(
        s.invalidations_since(Tid::ZERO).await.unwrap(),
        None,
        "older than the first transaction"
    );
    s.vote(&txn(10, vec![store(2, Tid::ZERO, b"x")]))
        .await
        .unwrap();
    s.abort(10).await;
    let info = s.info();
    assert_eq!(
        (info.length, info.size, info.supports_undo),
        (2, fs.core().size(), true)
    );
    assert!(info
        .interfaces
        .contains(&("ZODB.interfaces".into(), "IExternalGC".into())));
    s.close().await.unwrap();
    assert!(p.with_extension("fs.index").exists());
}

/// Remembers the highest tid the sink was told about.
struct MaxTold(std::sync::atomic::AtomicU64);

impl InvalidationSink for MaxTold {
    fn invalidate(&self, tid: Tid, _oids: &[Oid], _committer: Option<TxnKey>) {
        // Widens the window in which a wrongly ordered finish would expose the commit.
        std::thread::sleep(std::time::Duration::from_micros(300));
        self.0.fetch_max(tid.0, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Loads running during commits never fail, and never return a revision the sink has not
/// been told about yet (what keeps a client's cache from going stale).
#[test]
fn loads_race_commits_safely() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    let dir = tempfile::tempdir().unwrap();
    let core = Arc::new(
        FileStorageCore::open(
            dir.path().join("Data.fs"),
            Options {
                create: true,
                ..Options::default()
            },
        )
        .unwrap(),
    );
    let sink = Arc::new(MaxTold(Default::default()));
    core.attach(sink.clone());
    let mut serials = [Tid::ZERO; 8];
    let first = zodb::timestamp::new_tid(Tid::ZERO).unwrap();
    let mut t0 = txn(
        0,
        (0..8)
            .map(|o| store(o, Tid::ZERO, format!("{}", first.0).as_bytes()))
            .collect(),
    );
    t0.meta.tid = Some(first);
    serials.fill(commit(&core, &t0));
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        for r in 0..2u64 {
            let (core, sink, done) = (&core, &sink, &done);
            s.spawn(move || {
                let mut n = 0u64;
                while !done.load(SeqCst) {
                    let oid = Oid((n + r) % 8);
                    let lb = core.load_before(oid, Tid::MAX).unwrap();
                    let rev = lb.revision.unwrap();
                    let told = Tid(sink.0.load(SeqCst));
                    assert!(
                        rev.start <= lb.snapshot.max(told),
                        "{rev:?} newer than snapshot {:?} and {told:?}",
                        lb.snapshot
                    );
                    assert_eq!(rev.data, format!("{}", rev.start.0).as_bytes());
                    let h = core.history(oid, 3).unwrap();
                    assert!(h[0].tid >= rev.start);
                    n += 1;
                }
                assert!(n > 0);
            });
        }
        for k in 1..200u64 {
            let o = (k % 8) as usize;
            let next = zodb::timestamp::new_tid(core.last_transaction()).unwrap();
            // Data names its own tid, so readers can check it; use an explicit tid.
            let mut t = txn(
                k,
                vec![store(
                    o as u64,
                    serials[o],
                    format!("{}", next.0).as_bytes(),
                )],
            );
            t.meta.tid = Some(next);
            serials[o] = commit(&core, &t);
        }
        done.store(true, SeqCst);
    });
    scan::verify(&std::fs::File::open(dir.path().join("Data.fs")).unwrap()).unwrap();
}

/// Python's `restore(..., prev_txn)`: a back pointer to the record of the oid in
/// `prev_txn` when that record holds the same data (or is itself a back pointer), the
/// data otherwise, and when `prev_txn` is not in the file. `vote_restore` invalidates
/// the restored oids; a client's restore (`vote`) does not.
#[test]
fn restore_with_prev_txn_writes_back_pointers() {
    let (sim, core) = sim_storage(writable());
    let (sink, _) = Recorder::new(None);
    core.attach(sink.clone());
    let t1 = commit(&core, &txn(1, vec![store(1, Tid::ZERO, b"one")]));
    let restore = |key, tid: Tid, data: &'static [u8], prev_txn| {
        let mut t = txn(
            key,
            vec![TxnOp::Restore {
                oid: Oid(1),
                serial: tid,
                data: Some(Bytes::from_static(data)),
                prev_txn,
            }],
        );
        t.meta.tid = Some(tid);
        assert!(matches!(
            core.vote_restore(&t, &[]).unwrap(),
            Vote::Ok { .. }
        ));
        core.finish(key).unwrap()
    };
    let t2 = restore(2, Tid(t1.0 + 10), b"one", Some(t1));
    let t3 = restore(3, Tid(t1.0 + 20), b"other", Some(t1));
    let t4 = restore(4, Tid(t1.0 + 30), b"one", Some(Tid(t1.0 + 1)));
    // A back pointer to a back pointer is trusted.
    let t5 = restore(5, Tid(t1.0 + 40), b"one", Some(t2));
    let mut it = core.iterator(None, None).unwrap();
    let mut seen = Vec::new();
    while let Some((at, info)) = it.next_txn().unwrap() {
        let mut records = crate::iter::RecordIter::new(it.view().clone(), at);
        let (pos, r) = records.next_raw().unwrap().unwrap();
        let h = it.view().record(Oid(1), pos).unwrap();
        seen.push((info.tid, r.data.unwrap(), r.data_txn, h.plen, h.back));
    }
    let pos_of = |n: usize| {
        let mut it = core.iterator(None, None).unwrap();
        let mut at = None;
        for _ in 0..=n {
            at = it.next_txn().unwrap().map(|(a, _)| a);
        }
        at.unwrap().records_start()
    };
    let one = Bytes::from_static(b"one");
    assert_eq!(
        seen,
        vec![
            (t1, one.clone(), None, 3, 0),
            (t2, one.clone(), Some(t1), 0, pos_of(0)),
            (t3, Bytes::from_static(b"other"), None, 5, 0),
            (t4, one.clone(), None, 3, 0),
            (t5, one.clone(), Some(t2), 0, pos_of(1)),
        ]
    );
    assert_eq!(core.load(Oid(1)).unwrap(), (one, t5));
    let calls = sink.calls.lock().clone();
    assert_eq!(calls.len(), 5);
    assert!(calls[1..].iter().all(|(_, oids, _)| oids == &[Oid(1)]));
    scan::verify(&*sim).unwrap();
}
