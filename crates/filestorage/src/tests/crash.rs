//! Crash tests: commit some transactions, then "lose power" at every point of the next
//! commit, with every way the unsynced writes may have reached the disk, reopen, and check
//! that every finished transaction is intact, the unfinished one is entirely absent (or,
//! once its fsync began, entirely present), and the file is valid.

use super::*;
use crate::scan;
use fsio::sim::{Fate, SimOp};

const OIDS: &[u64] = &[0, 1, 2, 3, 4, 5];

fn blob(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add(u8::try_from(i * 7 % 251).expect("below 251")))
        .collect()
}

/// Three committed transactions (with multi-page records and a deletion).
fn base(core: &FileStorageCore) {
    let t1 = commit(
        core,
        &txn(
            1,
            vec![
                store(0, Tid::ZERO, b"root"),
                store(1, Tid::ZERO, b"a"),
                store(2, Tid::ZERO, b"b"),
            ],
        ),
    );
    let t2 = commit(
        core,
        &txn(
            2,
            vec![store(1, t1, b"a2"), store(3, Tid::ZERO, &blob(1, 3000))],
        ),
    );
    commit(
        core,
        &txn(
            3,
            vec![TxnOp::Delete {
                oid: Oid(2),
                serial: t1,
            }],
        ),
    );
    let _ = t2;
}

fn in_flight_ops(core: &FileStorageCore, seed: u8) -> Vec<TxnOp> {
    let root = core.load(Oid(0)).unwrap().1;
    let three = core.load(Oid(3)).unwrap().1;
    vec![
        store(0, root, &blob(seed, 50)),
        store(3, three, &blob(seed, 9000)),
        store(4, Tid::ZERO, &blob(seed, 20)),
    ]
}

/// The commit interrupted by the crash.
fn simple_commit(core: &FileStorageCore) {
    commit(core, &txn(10, in_flight_ops(core, 1)));
}

/// A vote that is aborted, then a transaction of the same layout written at the same place.
fn abort_then_commit(core: &FileStorageCore) {
    let a = txn(10, in_flight_ops(core, 1));
    assert!(matches!(core.vote(&a).unwrap(), Vote::Ok { .. }));
    core.abort(10);
    commit(core, &txn(11, in_flight_ops(core, 2)));
}

/// All images for one crash point under a model.
fn images(base: &[u8], pending: &[SimOp], arbitrary: bool, step: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if arbitrary {
        // Each unsynced operation independently lost, complete or partly written.
        let fates: Vec<Vec<Fate>> = pending
            .iter()
            .map(|op| SimFile::arbitrary_fates(op, step))
            .collect();
        let mut choice = vec![0usize; pending.len()];
        loop {
            let mut img = base.to_vec();
            for (i, op) in pending.iter().enumerate() {
                SimFile::apply(&mut img, op, fates[i][choice[i]]);
            }
            out.push(img);
            let mut i = 0;
            loop {
                if i == choice.len() {
                    return out;
                }
                choice[i] += 1;
                if choice[i] < fates[i].len() {
                    break;
                }
                choice[i] = 0;
                i += 1;
            }
        }
    }
    // In order: the first k operations complete, the next one lost or torn.
    for k in 0..=pending.len() {
        let mut img = base.to_vec();
        for op in &pending[..k] {
            SimFile::apply(&mut img, op, Fate::Full);
        }
        match pending.get(k) {
            None => out.push(img),
            Some(op) => {
                for fate in SimFile::ordered_fates(op, step) {
                    if fate == Fate::Full {
                        continue;
                    }
                    let mut i = img.clone();
                    SimFile::apply(&mut i, op, fate);
                    out.push(i);
                }
            }
        }
    }
    out
}

/// Runs `in_flight` after the base transactions, then checks every crash image of it.
/// Returns the number of images checked, or the first problem found.
fn run(
    sync_on_vote: bool,
    arbitrary: bool,
    in_flight: fn(&FileStorageCore),
) -> Result<usize, String> {
    let options = Options {
        sync_on_vote,
        ..Options::default()
    };
    let (sim, core) = sim_storage(options.clone());
    base(&core);
    let durable = sim.contents();
    let start = sim.op_count();
    let before = observe(&core, OIDS);
    in_flight(&core);
    let after = observe(&core, OIDS);
    assert_ne!(before, after);
    let log = sim.ops_since(start);
    let mut checked = 0;
    for at in 0..=log.len() {
        let (img, pending) = SimFile::crash_base(&durable, &log, at);
        for image in images(&img, &pending, arbitrary, 211) {
            let sim2 = Arc::new(SimFile::with_contents(image));
            let core2 = FileStorageCore::open_io(sim2.clone(), "sim", options.clone())
                .map_err(|e| format!("crash point {at}: reopen failed: {e}"))?;
            let summary = scan::verify(&*sim2)
                .map_err(|e| format!("crash point {at}: invalid file after recovery: {e}"))?;
            let seen = observe(&core2, OIDS);
            if at == log.len() {
                if seen != after {
                    return Err(format!(
                        "crash after finish returned lost the transaction:\n{seen}"
                    ));
                }
            } else if seen != before && seen != after {
                return Err(format!(
                    "crash point {at}: partial state\n{seen}\nbefore:\n{before}\nafter:\n{after}"
                ));
            }
            // The recovered storage keeps working.
            let root = core2.load(Oid(0)).unwrap().1;
            let t = commit(&core2, &txn(99, vec![store(0, root, b"later")]));
            assert!(t > summary.last_tid);
            scan::verify(&*sim2).unwrap();
            checked += 1;
        }
    }
    Ok(checked)
}

#[test]
fn crash_during_commit_in_order_writes() {
    let n = run(false, false, simple_commit).unwrap();
    assert!(n > 200, "{n} images");
}

#[test]
fn crash_during_abort_and_retry_in_order_writes() {
    let n = run(false, false, abort_then_commit).unwrap();
    assert!(n > 400, "{n} images");
}

#[test]
fn crash_during_commit_any_order_with_sync_on_vote() {
    let n = run(true, true, simple_commit).unwrap();
    assert!(n > 400, "{n} images");
}

#[test]
fn crash_during_abort_and_retry_any_order_with_sync_on_vote() {
    let n = run(true, true, abort_then_commit).unwrap();
    assert!(n > 1000, "{n} images");
}

/// Why [`Options::sync_on_vote`] exists: with one fsync per commit (Python's policy), a
/// crash during finish on a disk that persists pieces of a write out of order can leave a
/// finished-looking transaction with damaged contents that no open-time check can see.
#[test]
fn one_sync_per_commit_is_not_enough_for_out_of_order_writes() {
    let e = run(false, true, simple_commit).unwrap_err();
    assert!(!e.contains("finish returned"), "{e}");
}
