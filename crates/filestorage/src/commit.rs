//! Turning a client transaction into the bytes of one transaction record (docs/filestorage.md §4), with
//! ZODB's conflict rules checked against the committed state.
//!
//! This module does no I/O of its own: the storage hands it a view of the committed state
//! ([`CommittedState`]) and writes the result. Rules, as the ZEO server expects them
//! (zeo-wire.md §3.4, §5):
//! - `Store`: a stale serial on an oid that has a committed revision is a conflict for the
//!   client to resolve; replay continues, and a later store of the same oid in the same
//!   transaction replaces (clears, if its serial is current) that oid's conflict. New oids
//!   are never checked.
//! - `CheckCurrent`: a changed object (or a serial other than z64 for a missing one) is a
//!   `ReadConflict` error.
//! - `Delete`: a missing oid is `PosKey`, a stale serial a `Conflict` error; it writes a
//!   `plen = 0, back = 0` record.
//! - `Restore`: no checks; the record's tid is the given serial (as in Python's `restore`).
//! - `Undo`: Python FileStorage's undo rules (see [`crate::undo`]): a back pointer to the
//!   revision before the undone one, "no state" for an undone creation; a changed object
//!   fails with `UndoError`, or becomes a conflict for the client to resolve when its class
//!   is known to resolve. The undone oids are returned in `changed` and invalidated.
//!
//! - `StoreBlob`: a `Store` whose record has a blob file; the file is committed with the
//!   record (see [`BlobSource`]). An undo that brings back a blob revision gets a blob file
//!   of its own too, a copy of the revision's, as Python's undo does.
//!
//! **One record per oid.** When a transaction touches an oid several times, only the last
//! operation is written, at the place of the oid's first operation. Python writes every
//! record; both are valid `Data.fs` (the last record is the one the index keeps), and one
//! record per oid is smaller and keeps Python's `.index` sanity check (which compares the
//! first records of the last transaction with the index) from rejecting our index.

use crate::format::{self, status, Payload, MAX_META_LEN, POSITION_LIMIT, TXN_HEADER_LEN};
use crate::undo::{self, InTxn, UndoContext, UndoResolution, UndoWrite};
use crate::view::FileView;
use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use zodb::{Conflict, Oid, StorageError, Tid, Transaction, TxnOp};

/// What the commit code needs to know about committed data.
pub(crate) trait CommittedState {
    /// Position of the oid's current record.
    fn position(&self, oid: Oid) -> Option<u64>;
    /// The serial (tid) of the record of `oid` at `pos`.
    fn serial_at(&self, oid: Oid, pos: u64) -> Result<Tid, StorageError>;
    /// The committed file, for undo.
    fn committed_view(&self) -> FileView;
    /// The storage's name, for error messages.
    fn name(&self) -> &str;
}

/// Settings of the storage that shape a commit.
#[derive(Debug, Default)]
pub(crate) struct Policy<'a> {
    /// Refuse records starting past this offset.
    pub quota: Option<u64>,
    /// Which undo conflicts go to the client.
    pub resolution: Option<&'a UndoResolution>,
    /// A pack is running: undo is refused, as Python disables it then (an undo committed
    /// during the pack could bring back revisions whose referents the pack drops).
    pub undo_disabled: bool,
    /// The storage has a blob directory: blob stores are accepted and undo carries blob
    /// files along.
    pub blobs: bool,
    /// The blob files of `Restore` operations (replication's `restoreBlob`), by oid.
    pub restore_blobs: &'a [(Oid, PathBuf)],
    /// `Restore` operations invalidate their oids: a replica applying its primary's
    /// transactions must tell its clients (a client's `restorea` does not, as in ZEO).
    pub invalidate_restores: bool,
}

/// Where the blob file of a new record comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobSource {
    /// A file the client uploaded (`storeBlobEnd`) or wrote into the shared directory.
    File(PathBuf),
    /// The committed file of the revision with this tid (undo).
    Revision(Tid),
}

/// The error for an undo while a pack runs, Python's words.
pub(crate) fn undo_disabled() -> StorageError {
    StorageError::Undo {
        reason: "Undo is currently disabled for database maintenance.<p>".into(),
        oid: None,
    }
}

/// A transaction ready to be written at its position.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub tid: Tid,
    /// The status `finish` writes over the `'c'`.
    pub status: u8,
    /// The complete record, with status `'c'` and the trailer, in pieces to be written one
    /// after the other: headers and small data copied together, large data referenced as
    /// the client sent it (a large transaction is not built a second time in memory; its
    /// data may be views of the server's spill file).
    pub pieces: Vec<Bytes>,
    /// Absolute position of each written record, to merge into the index at finish.
    pub tindex: Vec<(Oid, u64)>,
    /// Oids of the `Store` and `Undo` operations in the order sent, duplicates kept
    /// (what the invalidation must list).
    pub invalidated: Vec<Oid>,
    /// Oids whose committed data differs from what the client sent: those undone.
    pub changed: Vec<Oid>,
    /// The blob files the transaction commits, one per record that has one.
    pub blobs: Vec<(Oid, BlobSource)>,
}

#[derive(Debug)]
pub(crate) enum Prepare {
    Ready(Prepared),
    Conflicts(Vec<Conflict>),
}

/// What a planned record holds.
#[derive(Debug, Clone)]
enum PlannedData {
    Data(Bytes),
    /// A back pointer (undo).
    Back(u64),
    /// No state: a deletion, an undone creation or `restore(data=None)`.
    NoState,
}

/// The outcome of the replay, before serialisation.
struct Planned {
    oid: Oid,
    /// Serial written in the record.
    tid: Tid,
    data: PlannedData,
    blob: Option<BlobSource>,
}

/// The records planned so far, one per oid, in the order of each oid's first operation.
#[derive(Default)]
struct Plan {
    records: Vec<Planned>,
    slot_of: HashMap<Oid, usize>,
}

impl Plan {
    fn set(&mut self, p: Planned) {
        match self.slot_of.get(&p.oid) {
            Some(&i) => self.records[i] = p,
            None => {
                self.slot_of.insert(p.oid, self.records.len());
                self.records.push(p);
            }
        }
    }

    fn get(&self, oid: Oid) -> Option<&Planned> {
        self.slot_of.get(&oid).map(|&i| &self.records[i])
    }
}

/// Conflicts keyed by oid, in the order they were first found.
#[derive(Default)]
struct Conflicts {
    slots: Vec<Option<Conflict>>,
    by_oid: HashMap<Oid, usize>,
}

impl Conflicts {
    fn set(&mut self, c: Conflict) {
        match self.by_oid.get(&c.oid) {
            Some(&i) => self.slots[i] = Some(c),
            None => {
                self.by_oid.insert(c.oid, self.slots.len());
                self.slots.push(Some(c));
            }
        }
    }

    fn clear(&mut self, oid: Oid) {
        if let Some(i) = self.by_oid.remove(&oid) {
            self.slots[i] = None;
        }
    }

    fn contains(&self, oid: Oid) -> bool {
        self.by_oid.contains_key(&oid)
    }

    fn into_vec(self) -> Vec<Conflict> {
        self.slots.into_iter().flatten().collect()
    }
}

fn check_meta(what: &str, v: &[u8]) -> Result<(), StorageError> {
    if v.len() > MAX_META_LEN {
        return Err(StorageError::Value(format!(
            "{what} too long ({} bytes, at most {MAX_META_LEN})",
            v.len()
        )));
    }
    Ok(())
}

/// The status byte for `meta.status` (0, the `Default`, means committed).
fn final_status(s: u8) -> Result<u8, StorageError> {
    match s {
        0 | status::COMMITTED => Ok(status::COMMITTED),
        status::PACKED => Ok(status::PACKED),
        other => Err(StorageError::Value(format!(
            "invalid transaction status {:?}",
            other as char
        ))),
    }
}

/// Replays `txn` against `state` and, when nothing conflicts, serialises it to be written
/// at `pos` with tid `tid`. `max_oid` is raised to the highest oid stored or restored.
pub(crate) fn prepare(
    txn: &Transaction,
    tid: Tid,
    pos: u64,
    policy: &Policy<'_>,
    state: &dyn CommittedState,
    max_oid: &mut u64,
) -> Result<Prepare, StorageError> {
    let meta = &txn.meta;
    check_meta("user name", &meta.user)?;
    check_meta("description", &meta.description)?;
    check_meta("extension data", &meta.extension)?;
    let final_status = final_status(meta.status)?;

    let mut plan = Plan::default();
    let current_serial = |oid: Oid| -> Result<Option<Tid>, StorageError> {
        match state.position(oid) {
            Some(p) => state.serial_at(oid, p).map(Some),
            None => Ok(None),
        }
    };
    let mut conflicts = Conflicts::default();
    let mut invalidated = Vec::new();
    let mut changed = Vec::new();
    // Oids with an undo conflict waiting for the client's resolution.
    let mut undo_pending: HashSet<Oid> = HashSet::new();
    let mut view: Option<FileView> = None;
    let default_resolution = UndoResolution::default();

    for op in &txn.ops {
        match op {
            TxnOp::Store { oid, serial, data }
            | TxnOp::StoreBlob {
                oid, serial, data, ..
            } => {
                let blob = match op {
                    TxnOp::StoreBlob { file, .. } if policy.blobs => {
                        Some(BlobSource::File(file.clone()))
                    }
                    TxnOp::StoreBlob { .. } => return Err(StorageError::Unsupported("blobs")),
                    _ => None,
                };
                if data.is_empty() {
                    // plen = 0 would make the record read as a back pointer.
                    return Err(StorageError::Value(format!(
                        "store of oid {oid} with empty data"
                    )));
                }
                match current_serial(*oid)? {
                    Some(committed) if committed != *serial => conflicts.set(Conflict {
                        oid: *oid,
                        committed,
                        read: *serial,
                        data: data.clone(),
                    }),
                    _ => {
                        conflicts.clear(*oid);
                        undo_pending.remove(oid);
                    }
                }
                *max_oid = (*max_oid).max(oid.0);
                invalidated.push(*oid);
                plan.set(Planned {
                    oid: *oid,
                    tid,
                    data: PlannedData::Data(data.clone()),
                    blob,
                });
            }
            TxnOp::CheckCurrent { oid, serial } => {
                let committed = current_serial(*oid)?.unwrap_or(Tid::ZERO);
                if committed != *serial {
                    return Err(StorageError::ReadConflict {
                        oid: *oid,
                        committed,
                        read: *serial,
                    });
                }
            }
            TxnOp::Delete { oid, serial } => {
                let committed = current_serial(*oid)?.ok_or(StorageError::PosKey(*oid))?;
                if committed != *serial {
                    return Err(StorageError::Conflict {
                        oid: *oid,
                        committed,
                        read: *serial,
                        class_name: None,
                    });
                }
                plan.set(Planned {
                    oid: *oid,
                    tid,
                    data: PlannedData::NoState,
                    blob: None,
                });
            }
            TxnOp::Restore {
                oid,
                serial,
                data,
                prev_txn,
            } => {
                if data.as_ref().is_some_and(|d| d.is_empty()) {
                    return Err(StorageError::Value(format!(
                        "restore of oid {oid} with empty data (use None for no state)"
                    )));
                }
                let blob = match policy.restore_blobs.iter().find(|(o, _)| o == oid) {
                    Some(_) if !policy.blobs => return Err(StorageError::Unsupported("blobs")),
                    Some((_, file)) => Some(BlobSource::File(file.clone())),
                    None => None,
                };
                *max_oid = (*max_oid).max(oid.0);
                if policy.invalidate_restores {
                    invalidated.push(*oid);
                }
                let back = match prev_txn {
                    Some(prev) => {
                        let view = view.get_or_insert_with(|| state.committed_view());
                        restore_back_pointer(view, *oid, *prev, data.as_deref())
                            .map_err(|e: crate::error::Error| e.in_storage(state.name()))?
                    }
                    None => None,
                };
                plan.set(Planned {
                    oid: *oid,
                    tid: *serial,
                    data: match (back, data) {
                        (Some(b), _) => PlannedData::Back(b),
                        (None, Some(d)) => PlannedData::Data(d.clone()),
                        (None, None) => PlannedData::NoState,
                    },
                    blob,
                });
            }
            TxnOp::Undo { transaction_id } => {
                if policy.undo_disabled {
                    return Err(undo_disabled());
                }
                let undone =
                    zodb::tid_from_undo_id(transaction_id).ok_or_else(|| StorageError::Undo {
                        reason: "Invalid transaction id".into(),
                        oid: None,
                    })?;
                let view = view.get_or_insert_with(|| state.committed_view());
                let committed = |oid: Oid| state.position(oid);
                let in_txn = |oid: Oid| {
                    plan.get(oid).map(|p| match &p.data {
                        PlannedData::Data(d) => InTxn::Data(d),
                        PlannedData::Back(b) => InTxn::Back(*b),
                        PlannedData::NoState => InTxn::NoState,
                    })
                };
                let ctx = UndoContext {
                    view,
                    name: state.name(),
                    committed: &committed,
                    in_txn: &in_txn,
                    resolution: policy.resolution.unwrap_or(&default_resolution),
                };
                let undo = undo::plan_undo(&ctx, undone)?;
                // An object whose earlier undo waits for the client's resolution cannot
                // be undone again in the same transaction: the client resolves against
                // committed revisions only, so the two could not be combined.
                let touched = undo
                    .writes
                    .iter()
                    .map(|(o, _)| *o)
                    .chain(undo.conflicts.iter().map(|c| c.oid));
                let blocked: Vec<(Oid, String)> = touched
                    .filter(|o| undo_pending.contains(o) || conflicts.contains(*o))
                    .map(|o| (o, "Some data were modified by a later transaction".into()))
                    .collect();
                if !blocked.is_empty() {
                    return Err(StorageError::MultipleUndo(blocked));
                }
                for (oid, w) in undo.writes {
                    invalidated.push(oid);
                    changed.push(oid);
                    let blob = match w {
                        UndoWrite::Back(b) if policy.blobs => undone_blob(view, state, oid, b)?,
                        _ => None,
                    };
                    plan.set(Planned {
                        oid,
                        tid,
                        data: match w {
                            UndoWrite::Back(b) => PlannedData::Back(b),
                            UndoWrite::NoState => PlannedData::NoState,
                        },
                        blob,
                    });
                }
                for c in undo.conflicts {
                    undo_pending.insert(c.oid);
                    conflicts.set(c);
                }
            }
        }
    }

    let conflicts = conflicts.into_vec();
    if !conflicts.is_empty() {
        return Ok(Prepare::Conflicts(conflicts));
    }

    let planned = plan.records;
    let header_len =
        TXN_HEADER_LEN + meta.user.len() + meta.description.len() + meta.extension.len();
    let body_len: u64 = planned.iter().map(|p| payload(p).record_len()).sum::<u64>();
    let tlen = header_len as u64 + body_len;
    let end = pos
        .checked_add(tlen)
        .and_then(|e| e.checked_add(8))
        .filter(|&e| e < POSITION_LIMIT)
        .ok_or_else(|| {
            StorageError::Value("the transaction would grow Data.fs past 2^48 bytes".into())
        })?;
    let cap = usize::try_from(end - pos)
        .map_err(|_| StorageError::Value("transaction too large".into()))?;
    let mut pieces = Vec::new();
    let mut bytes = Vec::with_capacity(cap.min(BY_REFERENCE * 2));
    let mut written = 0u64;
    format::write_txn_header(
        &mut bytes,
        tid,
        tlen,
        status::CHECKPOINT,
        &meta.user,
        &meta.description,
        &meta.extension,
    );
    let mut tindex = Vec::with_capacity(planned.len());
    for p in &planned {
        let here = pos + written + bytes.len() as u64;
        if policy.quota.is_some_and(|q| here > q) {
            return Err(StorageError::Quota);
        }
        let prev = state.position(p.oid).unwrap_or(0);
        match &p.data {
            PlannedData::Data(d) if d.len() >= BY_REFERENCE => {
                format::write_data_header(&mut bytes, p.oid, p.tid, prev, pos, d.len() as u64);
                written += bytes.len() as u64 + d.len() as u64;
                pieces.push(Bytes::from(std::mem::take(&mut bytes)));
                pieces.push(d.clone());
            }
            _ => format::write_data_record(&mut bytes, p.oid, p.tid, prev, pos, payload(p)),
        }
        tindex.push((p.oid, here));
    }
    bytes.extend_from_slice(&tlen.to_be_bytes());
    written += bytes.len() as u64;
    pieces.push(Bytes::from(bytes));
    debug_assert_eq!(written, end - pos);
    let blobs = planned
        .into_iter()
        .filter_map(|p| p.blob.map(|b| (p.oid, b)))
        .collect();
    Ok(Prepare::Ready(Prepared {
        tid,
        status: final_status,
        pieces,
        tindex,
        invalidated,
        changed,
        blobs,
    }))
}

/// Python's `restore` with a `prev_txn`: the position of the record of `oid` in the
/// committed transaction `prev_txn` (the last one, when it has several), to be written as
/// a back pointer instead of the data, as `FileStorage._data_find` finds it. A record
/// without data there is trusted as is; one with data only when it is `data`, byte for
/// byte. `None` (write the data) when that transaction or record is not in the file: the
/// hint is ignored, as Python's comment says it should be (a pack may have removed it).
fn restore_back_pointer(
    view: &FileView,
    oid: Oid,
    prev_txn: Tid,
    data: Option<&[u8]>,
) -> crate::error::Result<Option<u64>> {
    let Some(t) = view.find_txn(prev_txn)? else {
        return Ok(None);
    };
    let mut found = None;
    for r in view.records(&t) {
        let (pos, h) = r?;
        if h.oid == oid {
            found = Some((pos, h));
        }
    }
    let Some((pos, h)) = found else {
        return Ok(None);
    };
    if h.plen == 0 {
        return Ok(Some(pos));
    }
    match data {
        Some(d) if d.len() as u64 == h.plen && view.inline_data(pos, &h)? == d => Ok(Some(pos)),
        _ => Ok(None),
    }
}

/// The blob an undo record brings back: when the revision its back pointer leads to is a
/// blob, the tid of the record holding that revision's data, whose file the undo copies
/// (`FileStorage._txn_undo_write`). A record that no longer loads has nothing to copy.
fn undone_blob(
    view: &FileView,
    state: &dyn CommittedState,
    oid: Oid,
    back: u64,
) -> Result<Option<BlobSource>, StorageError> {
    let err = |e: crate::error::Error| e.in_storage(state.name());
    let Some((data, at)) = view.resolve(oid, back).map_err(err)? else {
        return Ok(None);
    };
    if !zodb::blob::is_blob_record(&data) {
        return Ok(None);
    }
    let tid = view.record(oid, at).map_err(err)?.tid;
    Ok(Some(BlobSource::Revision(tid)))
}

/// Data at least this large is written from the client's buffer rather than copied into
/// the transaction's record.
const BY_REFERENCE: usize = 64 * 1024;

impl Prepared {
    /// Bytes of the record.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len() as u64).sum()
    }
}

fn payload(p: &Planned) -> Payload<'_> {
    match &p.data {
        PlannedData::Data(d) => Payload::Data(d),
        PlannedData::Back(b) => Payload::Back(*b),
        PlannedData::NoState => Payload::Back(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{DataHeader, TxnHeader};
    use zodb::TransactionMeta;

    fn bytes_of(p: &Prepared) -> Vec<u8> {
        p.pieces.concat()
    }

    /// oid → (position, serial)
    struct Fake(HashMap<Oid, (u64, Tid)>);

    impl CommittedState for Fake {
        fn position(&self, oid: Oid) -> Option<u64> {
            self.0.get(&oid).map(|v| v.0)
        }
        fn serial_at(&self, oid: Oid, _pos: u64) -> Result<Tid, StorageError> {
            Ok(self.0[&oid].1)
        }
        fn committed_view(&self) -> FileView {
            let sim = fsio::sim::SimFile::with_contents(b"FS30".to_vec());
            FileView::new(std::sync::Arc::new(sim), 4)
        }
        fn name(&self) -> &str {
            "fake"
        }
    }

    fn txn(ops: Vec<TxnOp>) -> Transaction {
        Transaction {
            key: 1,
            meta: TransactionMeta::default(),
            ops,
        }
    }

    fn store(oid: u64, serial: u64, data: &'static [u8]) -> TxnOp {
        TxnOp::Store {
            oid: Oid(oid),
            serial: Tid(serial),
            data: Bytes::from_static(data),
        }
    }

    fn state() -> Fake {
        Fake(HashMap::from([
            (Oid(0), (52, Tid(10))),
            (Oid(1), (100, Tid(20))),
        ]))
    }

    fn run(t: &Transaction) -> Result<Prepare, StorageError> {
        let mut max = 1;
        prepare(t, Tid(30), 200, &Policy::default(), &state(), &mut max)
    }

    #[test]
    fn stale_store_is_a_conflict_and_a_current_restore_clears_it() {
        let t = txn(vec![
            store(0, 9, b"x"),
            store(1, 20, b"y"),
            store(5, 0, b"new"),
        ]);
        match run(&t).unwrap() {
            Prepare::Conflicts(c) => assert_eq!(
                c,
                vec![Conflict {
                    oid: Oid(0),
                    committed: Tid(10),
                    read: Tid(9),
                    data: Bytes::from_static(b"x")
                }]
            ),
            other => panic!("{other:?}"),
        }
        let t = txn(vec![
            store(0, 9, b"x"),
            store(1, 20, b"y"),
            store(0, 10, b"resolved"),
        ]);
        let Prepare::Ready(p) = run(&t).unwrap() else {
            panic!("expected ready")
        };
        assert_eq!(p.invalidated, vec![Oid(0), Oid(1), Oid(0)]);
        // One record per oid, the last data, in first-appearance order.
        assert_eq!(p.tindex.len(), 2);
        assert_eq!(p.tindex[0].0, Oid(0));
        let first = DataHeader::parse_slice(&bytes_of(&p)[23..]).unwrap();
        assert_eq!(
            (first.oid, first.prev, first.tloc, first.plen),
            (Oid(0), 52, 200, 8)
        );
        assert_eq!(&bytes_of(&p)[23 + 42..23 + 50], b"resolved");
        assert_eq!(p.tindex[0].1, 200 + 23);
    }

    #[test]
    fn a_second_stale_store_replaces_the_conflict() {
        let t = txn(vec![store(0, 9, b"x"), store(0, 8, b"z")]);
        let Prepare::Conflicts(c) = run(&t).unwrap() else {
            panic!()
        };
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].read, &c[0].data[..]), (Tid(8), &b"z"[..]));
    }

    #[test]
    fn check_current_delete_restore_undo() {
        let rc = run(&txn(vec![TxnOp::CheckCurrent {
            oid: Oid(1),
            serial: Tid(19),
        }]));
        assert!(matches!(
            rc,
            Err(StorageError::ReadConflict {
                oid: Oid(1),
                committed: Tid(20),
                read: Tid(19)
            })
        ));
        // A missing oid compares with z64.
        assert!(matches!(
            run(&txn(vec![TxnOp::CheckCurrent {
                oid: Oid(9),
                serial: Tid::ZERO
            }])),
            Ok(Prepare::Ready(_))
        ));
        assert!(matches!(
            run(&txn(vec![TxnOp::CheckCurrent {
                oid: Oid(9),
                serial: Tid(1)
            }])),
            Err(StorageError::ReadConflict { .. })
        ));
        assert!(matches!(
            run(&txn(vec![TxnOp::Delete {
                oid: Oid(9),
                serial: Tid::ZERO
            }])),
            Err(StorageError::PosKey(Oid(9)))
        ));
        assert!(matches!(
            run(&txn(vec![TxnOp::Delete {
                oid: Oid(1),
                serial: Tid(1)
            }])),
            Err(StorageError::Conflict {
                oid: Oid(1),
                committed: Tid(20),
                read: Tid(1),
                class_name: None,
            })
        ));
        let Prepare::Ready(p) = run(&txn(vec![TxnOp::Delete {
            oid: Oid(1),
            serial: Tid(20),
        }]))
        .unwrap() else {
            panic!()
        };
        let d = DataHeader::parse_slice(&bytes_of(&p)[23..]).unwrap();
        assert_eq!((d.plen, d.back, d.prev, d.tid), (0, 0, 100, Tid(30)));
        assert!(p.invalidated.is_empty());

        let Prepare::Ready(p) = run(&txn(vec![TxnOp::Restore {
            oid: Oid(7),
            serial: Tid(25),
            data: Some(Bytes::from_static(b"r")),
            prev_txn: None,
        }]))
        .unwrap() else {
            panic!()
        };
        let d = DataHeader::parse_slice(&bytes_of(&p)[23..]).unwrap();
        assert_eq!((d.tid, d.plen, d.prev), (Tid(25), 1, 0));
        assert!(matches!(
            run(&txn(vec![TxnOp::Undo {
                transaction_id: vec![]
            }])),
            Err(StorageError::Undo { .. })
        ));
        assert!(matches!(
            run(&txn(vec![TxnOp::Undo {
                transaction_id: zodb::undo_id(Tid(5))
            }])),
            Err(StorageError::Undo { .. })
        ));
    }

    #[test]
    fn header_limits_and_layout() {
        let mut t = txn(vec![store(3, 0, b"abc")]);
        t.meta.user = b"me".to_vec();
        t.meta.description = b"d".to_vec();
        t.meta.extension = b"ext".to_vec();
        let mut max = 0;
        let Prepare::Ready(p) =
            prepare(&t, Tid(30), 200, &Policy::default(), &state(), &mut max).unwrap()
        else {
            panic!()
        };
        assert_eq!(max, 3);
        let h = TxnHeader::parse(bytes_of(&p)[..23].try_into().unwrap());
        assert_eq!(
            (h.tid, h.status, h.ulen, h.dlen, h.elen),
            (Tid(30), b'c', 2, 1, 3)
        );
        let all = bytes_of(&p);
        assert_eq!(h.tlen + 8, all.len() as u64);
        assert_eq!(&all[all.len() - 8..], &h.tlen.to_be_bytes());
        assert_eq!(p.status, b' ');

        t.meta.user = vec![b'u'; 65536];
        assert!(matches!(run(&t), Err(StorageError::Value(m)) if m.contains("user")));
        t.meta.user = vec![];
        t.meta.status = b'u';
        assert!(matches!(run(&t), Err(StorageError::Value(_))));
        t.meta.status = b'p';
        let Prepare::Ready(p) = run(&t).unwrap() else {
            panic!()
        };
        assert_eq!(p.status, b'p');
        assert!(matches!(
            run(&txn(vec![store(3, 0, b"")])),
            Err(StorageError::Value(_))
        ));
        let mut max = 0;
        assert!(matches!(
            prepare(
                &txn(vec![store(3, 0, b"abc")]),
                Tid(30),
                200,
                &Policy {
                    quota: Some(100),
                    ..Policy::default()
                },
                &state(),
                &mut max
            ),
            Err(StorageError::Quota)
        ));
    }

    #[test]
    fn large_data_is_written_from_the_clients_buffer_in_the_same_layout() {
        let big = Bytes::from(vec![7u8; BY_REFERENCE + 1]);
        let ops = vec![
            store(3, 0, b"small"),
            TxnOp::Store {
                oid: Oid(4),
                serial: Tid::ZERO,
                data: big.clone(),
            },
            store(5, 0, b"after"),
        ];
        let Prepare::Ready(p) = run(&txn(ops)).unwrap() else {
            panic!()
        };
        assert!(
            p.pieces.iter().any(|piece| piece.as_ptr() == big.as_ptr()),
            "the large data was copied"
        );
        let all = bytes_of(&p);
        assert_eq!(all.len() as u64, p.len());
        let h = TxnHeader::parse(all[..23].try_into().unwrap());
        assert_eq!(h.tlen + 8, all.len() as u64);
        // Records at the positions the index gets, each with its data right behind it.
        let expected: [(u64, &[u8]); 3] = [(3, b"small"), (4, &big), (5, b"after")];
        for ((oid, at), (want_oid, want)) in p.tindex.iter().zip(expected) {
            let at = usize::try_from(at - 200).unwrap();
            let d = DataHeader::parse_slice(&all[at..]).unwrap();
            assert_eq!(
                (oid.0, d.oid.0, d.plen),
                (want_oid, want_oid, want.len() as u64)
            );
            assert_eq!(&all[at + 42..at + 42 + want.len()], want);
        }
        assert_eq!(&all[all.len() - 8..], &h.tlen.to_be_bytes());
    }
}
