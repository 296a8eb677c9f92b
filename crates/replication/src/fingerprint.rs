//! Fingerprints of transactions, to tell whether two nodes hold the same history.
//!
//! A replica names its most recent transactions with a fingerprint of each; the primary
//! computes the same over its own copy. The metadata fingerprint covers the tid, user,
//! description and extension; the records fingerprint also covers every data record (oid,
//! serial, resolved pickle), in file order. Pack rewrites old transactions (status `p`)
//! and drops records, so a packed copy on either side is compared by metadata only.

use crate::codec::Held;
use filestorage::format::status;
use filestorage::iter::RecordIter;
use filestorage::view::{FileView, TxnAt};
use filestorage::FileStorageCore;
use md5::{Digest, Md5};
use zodb::{StorageError, Tid};

fn corrupted(core: &FileStorageCore, e: filestorage::Error) -> StorageError {
    StorageError::Corrupted(format!("{}: {e}", core.name()))
}

fn put(m: &mut Md5, b: &[u8]) {
    m.update((b.len() as u64).to_be_bytes());
    m.update(b);
}

/// The fingerprints of the transaction at `t`.
pub fn of(core: &FileStorageCore, view: &FileView, t: &TxnAt) -> Result<Held, StorageError> {
    let (user, description, extension) = view.txn_meta(t).map_err(|e| corrupted(core, e))?;
    let mut meta = Md5::new();
    meta.update(t.header.tid.to_bytes());
    put(&mut meta, &user);
    put(&mut meta, &description);
    put(&mut meta, &extension);
    let meta: [u8; 16] = meta.finalize().into();
    let records = if t.header.status == status::PACKED {
        None
    } else {
        let mut m = Md5::new();
        m.update(meta);
        let mut it = RecordIter::new(view.clone(), *t);
        while let Some(r) = it.next_record().map_err(|e| corrupted(core, e))? {
            m.update(r.oid.to_bytes());
            m.update(r.tid.to_bytes());
            match &r.data {
                Some(d) => {
                    m.update([1]);
                    put(&mut m, d);
                }
                None => m.update([0]),
            }
        }
        Some(m.finalize().into())
    };
    Ok(Held {
        tid: t.header.tid,
        meta,
        records,
    })
}

/// Up to `count` of the newest transactions, newest first.
pub fn recent(core: &FileStorageCore, count: usize) -> Result<Vec<Held>, StorageError> {
    let view = core.view();
    let mut out = Vec::new();
    let mut end = view.end();
    while out.len() < count && end > filestorage::format::FIRST_TXN_POS {
        let t = view.txn_before(end).map_err(|e| corrupted(core, e))?;
        out.push(of(core, &view, &t)?);
        end = t.pos;
    }
    Ok(out)
}

/// Whether this storage holds `held` with the same content.
pub fn holds(core: &FileStorageCore, view: &FileView, held: &Held) -> Result<bool, StorageError> {
    let Some(t) = view.find_txn(held.tid).map_err(|e| corrupted(core, e))? else {
        return Ok(false);
    };
    let mine = of(core, view, &t)?;
    Ok(mine.meta == held.meta
        && match (mine.records, held.records) {
            (Some(a), Some(b)) => a == b,
            // One copy is packed: its records are not all there any more.
            _ => true,
        })
}

/// The outcome of checking a replica's recent transactions against this storage.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// The replica's last transaction is here, identical.
    Same,
    /// The replica holds transactions this storage lacks (newest first); `common` is the
    /// newest one both hold, if the replica's list reached back to one.
    Diverged {
        diverged: Vec<Tid>,
        common: Option<Tid>,
    },
}

/// Checks a replica's `recent` list (newest first). An empty list (an empty replica) is
/// always the same history.
pub fn check(core: &FileStorageCore, recent: &[Held]) -> Result<Verdict, StorageError> {
    let view = core.view();
    if let Some(last) = recent.first() {
        if packed_away(core, &view, last.tid)? {
            tracing::warn!(tid = %last.tid, "the replica's last transaction was packed away here; it goes on from the next one");
            return Ok(Verdict::Same);
        }
    }
    let mut diverged = Vec::new();
    for h in recent {
        if holds(core, &view, h)? {
            if diverged.is_empty() {
                return Ok(Verdict::Same);
            }
            return Ok(Verdict::Diverged {
                diverged,
                common: Some(h.tid),
            });
        }
        diverged.push(h.tid);
    }
    if diverged.is_empty() {
        return Ok(Verdict::Same);
    }
    Ok(Verdict::Diverged {
        diverged,
        common: None,
    })
}

/// Whether `tid` is not in this file but may have been removed by a pack: the first
/// transaction after it is a packed copy (pack drops transactions left without records,
/// and marks those it rewrites `p`), so `tid` lies before this storage's pack time.
fn packed_away(core: &FileStorageCore, view: &FileView, tid: Tid) -> Result<bool, StorageError> {
    if tid == Tid::ZERO
        || view
            .find_txn(tid)
            .map_err(|e| corrupted(core, e))?
            .is_some()
    {
        return Ok(false);
    }
    let mut it = filestorage::iter::TxnIter::new(view.clone(), Some(Tid(tid.0 + 1)), None)
        .map_err(|e| corrupted(core, e))?;
    Ok(it
        .next_txn()
        .map_err(|e| corrupted(core, e))?
        .is_some_and(|(_, info)| info.status == status::PACKED))
}
