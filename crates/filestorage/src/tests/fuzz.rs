//! Property tests ("fuzzing") of everything that reads untrusted bytes: the record-pickle
//! reference scanner and the Data.fs reader (open, loads, history, iteration, undo log,
//! the strict checker). Arbitrary and mutated inputs must give errors, never a panic or a
//! hang.

use super::history::{obj, record, undo};
use super::*;
use crate::iter::RecordIter;
use crate::scan;
use proptest::prelude::*;
use zodb::refs;

/// Bytes biased towards pickle opcodes, so the VM gets past the first byte.
fn pickle_like() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![
        3 => prop::sample::select(
            b"().0123NabcdeghjlpqrstuQPCKJMBXUTV]}\x80\x85\x86\x87\x88\x89\x8a\x8c\x8f\x90\x91\x93\x94\x95\x81\x92\x82".to_vec()
        ),
        1 => any::<u8>(),
    ];
    prop::collection::vec(op, 0..200)
}

/// A small valid Data.fs with the record kinds that matter: data, back pointers (undo),
/// an undone creation, several revisions, references between objects.
fn sample_file() -> Vec<u8> {
    let (sim, core) = sim_storage(writable());
    let t1 = commit(
        &core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, &obj(&[1, 2], "root")),
                store(
                    1,
                    Tid::ZERO,
                    &record("BTrees.OOBTree", "OOBucket", &[], "b"),
                ),
                store(2, Tid::ZERO, &obj(&[1], "two")),
            ],
        ),
    );
    let t2 = commit(
        &core,
        &txn(
            2,
            vec![store(
                1,
                t1,
                &record("BTrees.OOBTree", "OOBucket", &[2], "b2"),
            )],
        ),
    );
    core.vote(&txn(3, vec![undo(t2)])).unwrap();
    core.finish(3).unwrap();
    let t4 = commit(&core, &txn(4, vec![store(3, Tid::ZERO, &obj(&[], "new"))]));
    core.vote(&txn(5, vec![undo(t4)])).unwrap();
    core.finish(5).unwrap();
    sim.contents()
}

/// Runs every reader over `bytes`; only panics count as failures.
fn exercise(bytes: Vec<u8>) {
    let _ = scan::verify(&crate::sim::SimFile::with_contents(bytes.clone()));
    let sim = Arc::new(crate::sim::SimFile::with_contents(bytes));
    let Ok(core) = FileStorageCore::open_io(sim, "fuzz", read_only()) else {
        return;
    };
    let oids: Vec<Oid> = core
        .live
        .read()
        .index
        .iter()
        .map(|(o, _)| o)
        .take(50)
        .collect();
    for oid in oids {
        let _ = core.load(oid);
        let _ = core.load_before(oid, Tid::MAX);
        let _ = core.load_before(oid, Tid(1 << 60));
        if let Ok(h) = core.history(oid, 100) {
            for e in h {
                let _ = core.load_serial(oid, e.tid);
            }
        }
        let _ = core.record_iternext(Some(oid));
    }
    let _ = core.undo_log(0, 100, None);
    let _ = core.recent_transactions(100);
    let _ = core.invalidations_since(Tid(1));
    for (start, stop) in [
        (None, None),
        (Some(Tid(1 << 58)), None),
        (Some(Tid::MAX), None),
    ] {
        let Ok(mut it) = core.iterator(start, stop) else {
            continue;
        };
        for _ in 0..100 {
            match it.next_txn() {
                Ok(Some((t, _))) => {
                    let mut recs = RecordIter::new(it.view().clone(), t);
                    for _ in 0..100 {
                        match recs.next_record() {
                            Ok(Some(r)) => {
                                if let Some(d) = r.data {
                                    let _ = refs::references(&d);
                                }
                            }
                            _ => break,
                        }
                    }
                }
                _ => break,
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, .. ProptestConfig::default() })]

    #[test]
    fn reference_scanner_never_panics(p in pickle_like()) {
        let _ = refs::references(&p);
        let _ = refs::class_name(&p);
    }

    #[test]
    fn reference_scanner_on_arbitrary_bytes(p in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = refs::references(&p);
        let _ = refs::class_name(&p);
    }

    #[test]
    fn reader_survives_mutated_files(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = sample_file();
        for (at, v) in flips {
            let i = at.index(bytes.len());
            bytes[i] = v;
        }
        if truncate {
            let n = cut.index(bytes.len());
            bytes.truncate(n.max(4));
        }
        exercise(bytes);
    }

    #[test]
    fn reader_survives_arbitrary_files(tail in prop::collection::vec(any::<u8>(), 0..600)) {
        let mut bytes = b"FS30".to_vec();
        bytes.extend(tail);
        exercise(bytes);
    }
}

#[test]
fn the_sample_file_is_valid() {
    let bytes = sample_file();
    scan::verify(&crate::sim::SimFile::with_contents(bytes.clone())).unwrap();
    exercise(bytes);
}
