//! Open-time recovery of torn tails, and refusal of damage in the middle.

use super::*;
use crate::scan;
use zodb::StorageError;

const T1_END: usize = 166;
const T2_END: usize = 474;
const T1: Tid = Tid(0x03f5_9458_1777_7777);
const T2: Tid = Tid(0x03f5_9458_1777_7778);

fn open_sim(
    bytes: Vec<u8>,
    options: Options,
) -> Result<(Arc<SimFile>, FileStorageCore), StorageError> {
    let sim = Arc::new(SimFile::with_contents(bytes));
    FileStorageCore::open_io(sim.clone(), "sim", options).map(|c| (sim, c))
}

/// A copy of the spec file with T2's status byte set to 'c' (a crash between vote and
/// finish).
fn with_checkpoint() -> Vec<u8> {
    let mut f = SPEC_FS.to_vec();
    f[T1_END + 16] = b'c';
    f
}

#[test]
fn every_cut_inside_the_last_transaction_is_recovered() {
    for cut in T1_END + 1..T2_END {
        let f = SPEC_FS[..cut].to_vec();
        // Read-only: nothing is modified; the torn transaction is ignored.
        let (sim, ro) = open_sim(f.clone(), read_only()).unwrap();
        assert_eq!(sim.contents(), f);
        assert_eq!(
            (ro.last_transaction(), ro.size()),
            (T1, T1_END as u64),
            "cut {cut}"
        );
        // Writable: truncated to the end of T1.
        let (sim, core) = open_sim(f, writable()).unwrap();
        assert_eq!(sim.contents(), &SPEC_FS[..T1_END], "cut {cut}");
        assert_eq!(core.last_transaction(), T1);
        assert!(matches!(core.load(Oid(1)), Err(StorageError::PosKey(_))));
        assert_eq!(core.load(Oid(0)).unwrap().1, T1);
        let t = commit(&core, &txn(1, vec![store(1, Tid::ZERO, b"again")]));
        assert!(t > T1);
        scan::verify(&*sim).unwrap();
    }
}

#[test]
fn damaged_last_transactions_are_torn_tails() {
    let mut cases: Vec<(&str, Vec<u8>)> = vec![("checkpoint", with_checkpoint())];
    let mut f = SPEC_FS.to_vec();
    f[T2_END - 1] ^= 1;
    cases.push(("trailer", f));
    let mut f = SPEC_FS.to_vec();
    f[0x15e + 24 + 7] ^= 1; // oid 1's tloc
    cases.push(("tloc", f));
    let mut f = SPEC_FS.to_vec();
    f[0x15e + 34 + 7] -= 1; // oid 1's plen: records no longer fill the transaction
    cases.push(("plen", f));
    let mut f = SPEC_FS.to_vec();
    f[T1_END..T1_END + 23].fill(0); // header lost, rest present
    cases.push(("zero header", f));
    let mut f = SPEC_FS.to_vec();
    f[T1_END + 100..T2_END].fill(0); // header present, the rest lost
    cases.push(("zero body", f));
    let mut f = SPEC_FS.to_vec();
    f[T1_END + 8..T1_END + 16].copy_from_slice(&5u64.to_be_bytes()); // tlen < header
    cases.push(("short tlen", f));
    for (what, f) in cases {
        let (sim, core) = open_sim(f, writable()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(sim.contents(), &SPEC_FS[..T1_END], "{what}");
        assert_eq!(core.last_transaction(), T1, "{what}");
    }
}

#[test]
fn garbage_after_the_last_transaction_is_cut() {
    for extra in [
        &[0u8; 5][..],
        &[0u8; 40][..],
        &[0xffu8; 100][..],
        b"FS30 some random text that is longer than a header",
    ] {
        let mut f = SPEC_FS.to_vec();
        f.extend_from_slice(extra);
        let (sim, core) = open_sim(f, writable()).unwrap();
        assert_eq!(sim.contents(), SPEC_FS, "{extra:?}");
        assert_eq!(core.last_transaction(), T2);
    }
}

#[test]
fn damage_followed_by_a_valid_transaction_is_an_error() {
    let mut cases = Vec::new();
    let mut f = SPEC_FS.to_vec();
    f[T1_END - 1] ^= 1; // T1's trailer
    cases.push(("trailer", f));
    let mut f = SPEC_FS.to_vec();
    f[0x34 + 24 + 7] ^= 1; // root's tloc in T1
    cases.push(("tloc", f));
    let mut f = SPEC_FS.to_vec();
    f[4 + 16] = b'c'; // an unfinished transaction cannot be followed by a finished one
    cases.push(("checkpoint", f));
    let mut f = SPEC_FS.to_vec();
    f[4 + 8..4 + 16].copy_from_slice(&10_000u64.to_be_bytes()); // tlen past the end
    cases.push(("tlen", f));
    for (what, f) in cases {
        for options in [writable(), read_only()] {
            let before = f.clone();
            let sim = Arc::new(SimFile::with_contents(f.clone()));
            let e = FileStorageCore::open_io(sim.clone(), "sim", options).unwrap_err();
            match &e {
                StorageError::Corrupted(m) => assert!(m.contains("offset 4"), "{what}: {m}"),
                e => panic!("{what}: {e}"),
            }
            assert_eq!(sim.contents(), before, "{what}: file modified");
        }
    }
}

#[test]
fn cut_bytes_go_to_tr_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("Data.fs");
    for round in 0..2 {
        std::fs::write(&p, with_checkpoint()).unwrap();
        let core = FileStorageCore::open(&p, writable()).unwrap();
        assert_eq!(core.last_transaction(), T1);
        drop(core);
        assert_eq!(std::fs::read(&p).unwrap(), &SPEC_FS[..T1_END]);
        let tr = dir.path().join(format!("Data.fs.tr{round}"));
        assert_eq!(std::fs::read(&tr).unwrap(), &with_checkpoint()[T1_END..]);
    }
    // A fragment shorter than a header is cut without a copy (as Python does).
    let mut f = SPEC_FS.to_vec();
    f.extend_from_slice(b"0123456789");
    std::fs::write(&p, &f).unwrap();
    std::fs::remove_file(dir.path().join("Data.fs.index")).unwrap();
    FileStorageCore::open(&p, writable()).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), SPEC_FS);
    assert!(!dir.path().join("Data.fs.tr2").exists());
}

#[test]
fn undone_status_transactions_are_skipped() {
    let mut f = SPEC_FS.to_vec();
    f[T1_END + 16] = b'u';
    let (_, core) = open_sim(f, read_only()).unwrap();
    assert_eq!(core.last_transaction(), T2);
    assert_eq!(core.load(Oid(0)).unwrap().1, T1);
    assert!(matches!(core.load(Oid(1)), Err(StorageError::PosKey(_))));
}

#[test]
fn arbitrary_bytes_never_panic() {
    // Mutate every byte of the example file a few ways: opening may fail, but must not
    // panic, and whatever opens must serve loads without panicking.
    for i in 4..SPEC_FS.len() {
        for v in [0u8, 0xff, b'c', 0x80] {
            let mut f = SPEC_FS.to_vec();
            f[i] = v;
            if let Ok((_, core)) = open_sim(f, read_only()) {
                for o in 0..3 {
                    let _ = core.load_before(Oid(o), Tid::MAX);
                    let _ = core.history(Oid(o), 10);
                    let _ = core.load_serial(Oid(o), T1);
                }
                let _ = core.recent_transactions(10);
                let _ = core.invalidations_since(Tid::ZERO);
            }
        }
    }
}
