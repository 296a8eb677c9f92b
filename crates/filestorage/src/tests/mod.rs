//! Storage-level tests (over real files and the simulated file).

mod blobs;
mod crash;
mod crash_files;
mod fuzz;
mod history;
mod pack;
mod recovery;
mod storage;

use crate::{FileStorageCore, Options};
use bytes::Bytes;
use fsio::sim::SimFile;
use std::sync::Arc;
use zodb::{Oid, Tid, Transaction, TransactionMeta, TxnOp, Vote};

pub(crate) const SPEC_FS: &[u8] = include_bytes!("../../testdata/spec_example.fs");
pub(crate) const SPEC_INDEX: &[u8] = include_bytes!("../../testdata/spec_example.fs.index");

pub(crate) fn store(oid: u64, serial: Tid, data: &[u8]) -> TxnOp {
    TxnOp::Store {
        oid: Oid(oid),
        serial,
        data: Bytes::copy_from_slice(data),
    }
}

pub(crate) fn txn(key: u64, ops: Vec<TxnOp>) -> Transaction {
    Transaction {
        key,
        meta: TransactionMeta::default(),
        ops,
    }
}

/// Votes and finishes; panics unless both succeed.
pub(crate) fn commit(core: &FileStorageCore, t: &Transaction) -> Tid {
    match core.vote(t).expect("vote") {
        Vote::Ok { changed } => assert!(changed.is_empty()),
        Vote::Conflicts(c) => panic!("unexpected conflicts {c:?}"),
    }
    core.finish(t.key).expect("finish")
}

pub(crate) fn writable() -> Options {
    Options::default()
}

pub(crate) fn read_only() -> Options {
    Options {
        read_only: true,
        ..Options::default()
    }
}

/// A new, empty storage over a simulated file.
pub(crate) fn sim_storage(options: Options) -> (Arc<SimFile>, FileStorageCore) {
    let sim = Arc::new(SimFile::new());
    let core = FileStorageCore::open_io(sim.clone(), "sim", options).expect("open");
    (sim, core)
}

/// Reopens the bytes of a simulated file.
pub(crate) fn reopen(bytes: Vec<u8>, options: Options) -> (Arc<SimFile>, FileStorageCore) {
    let sim = Arc::new(SimFile::with_contents(bytes));
    let core = FileStorageCore::open_io(sim.clone(), "sim", options).expect("reopen");
    (sim, core)
}

/// Everything observable about `oids`: every revision through history + loadSerial,
/// current loads, and loadBefore at each revision's tid and tid+1.
pub(crate) fn observe(core: &FileStorageCore, oids: &[u64]) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    writeln!(s, "last {:?}", core.last_transaction()).unwrap();
    for &o in oids {
        let oid = Oid(o);
        writeln!(s, "oid {o} load {:?}", core.load(oid)).unwrap();
        let hist = match core.history(oid, 1000) {
            Ok(h) => h,
            Err(e) => {
                writeln!(s, "  history {e:?}").unwrap();
                continue;
            }
        };
        for h in hist {
            writeln!(
                s,
                "  rev {:?} size {} serial {:?}",
                h.tid,
                h.size,
                core.load_serial(oid, h.tid)
            )
            .unwrap();
            for before in [h.tid, Tid(h.tid.0 + 1)] {
                let lb = core.load_before(oid, before).map(|l| l.revision);
                writeln!(s, "  before {before:?} {lb:?}").unwrap();
            }
        }
    }
    s
}
