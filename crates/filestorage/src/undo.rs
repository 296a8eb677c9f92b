//! Undo (docs/filestorage.md §3.6 undoLog, §5 transactional undo), with Python FileStorage's rules.
//!
//! - [`undo_log`] walks back from the end: only `' '` transactions are listed, and the
//!   first `'p'` (packed) transaction ends the log — nothing before a pack can be undone.
//! - [`plan_undo`] works out, for each data record of the transaction being undone, the
//!   record the undoing transaction writes: a back pointer to the revision before it
//!   (`back = prev`), or "no state" (`back = 0`) when the undone record created the
//!   object. When the object changed since and the current state differs, Python runs
//!   application conflict resolution on the server. zeors cannot run Python, so such a
//!   record either becomes a [`Conflict`] handed to the client — which resolves it with its
//!   own classes (ZEO's client-side conflict resolution) and stores the result — when the
//!   object's class is one known to resolve ([`UndoResolution`]: the BTrees classes), or
//!   fails as Python does when resolution fails: `UndoError("Some data were modified by a
//!   later transaction")`.
//!   Failed records are collected and raised together as `MultipleUndoErrors`, with
//!   Python's "second chance" for a later record of the same oid.

use crate::error::Error;
use crate::format::status;
use crate::view::FileView;
use bytes::Bytes;
use std::collections::HashMap;
use zodb::{Conflict, Oid, StorageError, Tid, UndoEntry, UndoFilter};

/// Which classes' undo conflicts are offered to the client for resolution.
///
/// The built-in rule covers the classes of the ZODB stack that define
/// `_p_resolveConflict`: every class of the `BTrees` package (buckets and sets resolve;
/// a tree or tree set resolves while it holds a single inline bucket) and so
/// `BTrees.Length.Length`. More can be added as `module.Class` names, or prefixes ending
/// in `*`. For any other class a changed object makes the undo fail with Python's
/// `UndoError`. When the client cannot resolve an offered conflict it raises
/// `ConflictError` where Python's server-side resolution would give `UndoError`.
#[derive(Debug, Clone, Default)]
pub struct UndoResolution {
    pub extra: Vec<String>,
}

impl UndoResolution {
    /// Whether records of class `module.name` are offered to the client.
    pub fn resolvable(&self, module: &str, name: &str) -> bool {
        if module.starts_with("BTrees.") {
            return true;
        }
        let full = format!("{module}.{name}");
        self.extra.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => full.starts_with(prefix),
            None => *p == full,
        })
    }

    fn resolvable_record(&self, data: &[u8]) -> bool {
        zodb::refs::class_name(data).is_some_and(|(m, n)| self.resolvable(&m, &n))
    }
}

fn storage_err(view_name: &str, e: Error) -> StorageError {
    match e {
        Error::Io(e) => StorageError::Io(e),
        other => StorageError::Corrupted(format!("{view_name}: {other}")),
    }
}

/// `undoLog(first, last, filter)`: entries `first..last` among the undoable transactions
/// that pass `filter`, newest first. A negative `last` means `first - last` (Python's
/// "-n entries" convention).
pub fn undo_log(
    view: &FileView,
    first: i64,
    last: i64,
    filter: Option<&UndoFilter>,
) -> crate::error::Result<Vec<UndoEntry>> {
    let last = if last < 0 {
        first.saturating_sub(last)
    } else {
        last
    };
    let mut out = Vec::new();
    let mut i: i64 = 0;
    let mut end = view.end();
    while i < last && end > crate::format::FIRST_TXN_POS {
        let t = view.txn_before(end)?;
        end = t.pos;
        match t.header.status {
            status::PACKED => break,
            status::COMMITTED => {}
            _ => continue,
        }
        let (user, description, extension) = view.txn_meta(&t)?;
        let entry = UndoEntry {
            tid: t.header.tid,
            user,
            description,
            extension,
            size: t.header.tlen,
        };
        if filter.is_none_or(|f| f(&entry)) {
            if i >= first {
                out.push(entry);
            }
            i += 1;
        }
    }
    Ok(out)
}

/// The state of an oid written earlier in the undoing transaction itself.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InTxn<'a> {
    Data(&'a Bytes),
    Back(u64),
    NoState,
}

/// What an undo record writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum UndoWrite {
    /// `plen = 0, back = pos`: the revision at `pos` is current again.
    Back(u64),
    /// `plen = 0, back = 0`: the undone record created the object.
    NoState,
}

/// The outcome of undoing one transaction.
#[derive(Debug, Default)]
pub(crate) struct UndoPlan {
    /// Records to write, in the order of the undone transaction's records.
    pub writes: Vec<(Oid, UndoWrite)>,
    /// Changed objects for the client to resolve (old = the undone revision, committed =
    /// the current one, new = the revision before the undone one).
    pub conflicts: Vec<Conflict>,
}

/// Why one record cannot be undone; reported as `UndoError` / `MultipleUndoErrors`.
#[derive(Debug)]
enum RecordError {
    Undo(String),
    Storage(StorageError),
}

impl From<StorageError> for RecordError {
    fn from(e: StorageError) -> Self {
        RecordError::Storage(e)
    }
}

/// What the undoing transaction can see of the storage.
pub(crate) struct UndoContext<'a> {
    pub view: &'a FileView,
    pub name: &'a str,
    /// The oid's committed position (the index).
    pub committed: &'a dyn Fn(Oid) -> Option<u64>,
    /// What the undoing transaction wrote for the oid before this undo, if anything.
    pub in_txn: &'a dyn Fn(Oid) -> Option<InTxn<'a>>,
    pub resolution: &'a UndoResolution,
}

impl UndoContext<'_> {
    fn err(&self, e: Error) -> StorageError {
        storage_err(self.name, e)
    }

    fn load_back(&self, oid: Oid, back: u64) -> Result<Option<Bytes>, StorageError> {
        self.view.load_back(oid, back).map_err(|e| self.err(e))
    }

    /// Python's `_transactionalUndoRecord` for the record of `oid` at `pos` (serial
    /// `tid`, previous record `pre`).
    fn record(
        &self,
        oid: Oid,
        pos: u64,
        tid: Tid,
        pre: u64,
    ) -> Result<Result<UndoWrite, Conflict>, RecordError> {
        let in_txn = (self.in_txn)(oid);
        let ipos = (self.committed)(oid).unwrap_or(0);
        let load_failed = || RecordError::Undo("_loadBack() failed".into());
        // Set when the object changed since and its current state differs from the one
        // being undone: (current serial if committed, current data).
        let mut changed: Option<(Option<Tid>, Bytes)> = None;
        if in_txn.is_some() || ipos != pos {
            // A position no record can have: data written earlier in this transaction.
            const IN_TXN: u64 = u64::MAX;
            let (ctid, cdataptr, cdata) = match in_txn {
                Some(InTxn::Data(d)) => (None, IN_TXN, Some(d.clone())),
                Some(InTxn::Back(b)) => (None, b, None),
                Some(InTxn::NoState) => (None, 0, None),
                None => {
                    if ipos == 0 {
                        return Err(load_failed());
                    }
                    let h = self.view.record(oid, ipos).map_err(|e| self.err(e))?;
                    if h.plen > 0 {
                        let d = self.view.inline_data(ipos, &h).map_err(|e| self.err(e))?;
                        (Some(h.tid), ipos, Some(d))
                    } else {
                        (Some(h.tid), h.back, None)
                    }
                }
            };
            if cdataptr != pos {
                let undone = self.load_back(oid, pos)?.ok_or_else(load_failed)?;
                let cdata = match cdata {
                    Some(d) => d,
                    None => self.load_back(oid, cdataptr)?.ok_or_else(load_failed)?,
                };
                if undone != cdata {
                    if pre == 0 {
                        return Err(RecordError::Undo(
                            "Can't undo an add transaction followed by conflicting transactions."
                                .into(),
                        ));
                    }
                    changed = Some((ctid, cdata));
                }
            }
        }
        if pre == 0 {
            return Ok(Ok(UndoWrite::NoState));
        }
        let Some((ctid, cdata)) = changed else {
            return Ok(Ok(UndoWrite::Back(pre)));
        };
        let pre_data = self
            .load_back(oid, pre)?
            .ok_or_else(|| RecordError::Undo(format!("_loadBack() failed for {oid}")))?;
        match ctid {
            // The client resolves against committed revisions only (it loads them with
            // loadSerial), so a state written earlier in this transaction cannot be offered.
            Some(committed)
                if self.resolution.resolvable_record(&pre_data)
                    || self.resolution.resolvable_record(&cdata) =>
            {
                Ok(Err(Conflict {
                    oid,
                    committed,
                    read: tid,
                    data: pre_data,
                }))
            }
            _ => Err(RecordError::Undo(
                "Some data were modified by a later transaction".into(),
            )),
        }
    }
}

/// Plans the undo of the transaction with `tid` (Python's `undo` + `_txn_undo_write`).
pub(crate) fn plan_undo(ctx: &UndoContext<'_>, tid: Tid) -> Result<UndoPlan, StorageError> {
    let t = ctx
        .view
        .find_txn(tid)
        .map_err(|e| ctx.err(e))?
        .ok_or_else(|| StorageError::Undo {
            reason: "Invalid transaction id".into(),
            oid: None,
        })?;
    if t.header.status != status::COMMITTED {
        return Err(StorageError::Undo {
            reason: "non-undoable transaction".into(),
            oid: None,
        });
    }
    let mut plan = UndoPlan::default();
    // oid → (reason) of failed records, in first-failure order.
    let mut failures: Vec<(Oid, String)> = Vec::new();
    let mut conflict_of: HashMap<Oid, usize> = HashMap::new();
    for rec in ctx.view.records(&t) {
        let (pos, h) = rec.map_err(|e| ctx.err(e))?;
        // A later record of the same oid gets a second chance.
        failures.retain(|(o, _)| *o != h.oid);
        if let Some(i) = conflict_of.remove(&h.oid) {
            plan.conflicts.remove(i);
            for v in conflict_of.values_mut() {
                if *v > i {
                    *v -= 1;
                }
            }
        }
        let prev = ctx.view.prev_of(pos, &h).map_err(|e| ctx.err(e))?;
        match ctx.record(h.oid, pos, h.tid, prev) {
            Ok(Ok(w)) => {
                plan.writes.retain(|(o, _)| *o != h.oid);
                plan.writes.push((h.oid, w));
            }
            Ok(Err(c)) => {
                conflict_of.insert(h.oid, plan.conflicts.len());
                plan.conflicts.push(c);
            }
            Err(RecordError::Undo(reason)) => failures.push((h.oid, reason)),
            Err(RecordError::Storage(e)) => return Err(e),
        }
    }
    if !failures.is_empty() {
        return Err(StorageError::MultipleUndo(failures));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvable_classes() {
        let r = UndoResolution::default();
        assert!(r.resolvable("BTrees.OOBTree", "OOBucket"));
        assert!(r.resolvable("BTrees.IIBTree", "IISet"));
        assert!(r.resolvable("BTrees.Length", "Length"));
        assert!(r.resolvable("BTrees.OOBTree", "OOBTree"));
        assert!(!r.resolvable("persistent.mapping", "PersistentMapping"));
        assert!(!r.resolvable("BTreesX.y", "OOBucket"));
        let r = UndoResolution {
            extra: vec!["my.app.Counter".into(), "other.*".into()],
        };
        assert!(r.resolvable("my.app", "Counter"));
        assert!(r.resolvable("other.x", "Y"));
        assert!(!r.resolvable("my.app", "Other"));
    }
}
