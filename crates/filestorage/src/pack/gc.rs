//! Phase 1 of pack: what to keep from before the pack time (Python's
//! `findReachableAtPacktime` and `findReachableFromFuture`), with the checks Python's
//! `fspack` insists on while it reads (`checkTxn`, `checkData`).

use crate::error::Error;
use crate::format::{status, DataHeader, TxnHeader, FIRST_TXN_POS};
use crate::index::Index;
use crate::scan::SeqReader;
use crate::view::FileView;
use std::collections::{HashMap, HashSet};
use zodb::progress::{NoProgress, Progress, Unit};
use zodb::refs::RefScanner;
use zodb::{Oid, StorageError, Tid};

type Result<T, E = StorageError> = std::result::Result<T, E>;

/// What phase 1 decided to keep from before the pack time.
pub(super) struct Gc {
    /// oid → position of its last revision up to the pack time (`oid2curpos`).
    pub(super) curpos: Index,
    /// The oids whose `curpos` revision is reachable; `None` without GC (all are).
    pub(super) marked: Option<HashSet<Oid>>,
    /// More kept revisions: targets of back pointers after the pack time (undo).
    pub(super) extra: HashMap<Oid, Vec<u64>>,
    /// First transaction after the pack time.
    pub(super) packpos: u64,
    /// Old positions that back pointers after the pack time refer to: their new
    /// positions are remembered when copied, to rewrite those back pointers.
    pub(super) back_targets: HashSet<u64>,
}

impl Gc {
    pub(super) fn is_reachable(&self, oid: Oid, pos: u64) -> bool {
        let current = self.curpos.get(oid) == Some(pos)
            && self.marked.as_ref().is_none_or(|m| m.contains(&oid));
        current || self.extra.get(&oid).is_some_and(|l| l.contains(&pos))
    }
}

pub(super) fn corrupt(pos: u64, what: impl Into<String>) -> Error {
    Error::corrupted(pos, what)
}

/// Python's `checkTxn`: the rules pack insists on.
fn check_txn(h: &TxnHeader, pos: u64, ltid: &mut Tid, end: u64) -> crate::error::Result<()> {
    if h.tid <= *ltid && *ltid != Tid::ZERO {
        return Err(corrupt(
            pos,
            format!("time-stamp reduction: {} <= {}", h.tid, ltid),
        ));
    }
    *ltid = h.tid;
    if h.status == status::CHECKPOINT {
        return Err(corrupt(pos, "transaction with checkpoint flag set"));
    }
    if !matches!(
        h.status,
        status::COMMITTED | status::PACKED | status::UNDONE
    ) {
        return Err(corrupt(
            pos,
            format!("invalid transaction status {:?}", h.status as char),
        ));
    }
    if h.tlen < h.header_len() || h.end(pos).is_none_or(|e| e > end) {
        return Err(corrupt(
            pos,
            format!("invalid transaction length {}", h.tlen),
        ));
    }
    Ok(())
}

/// Python's `checkData`.
fn check_data(tpos: u64, tend: u64, d: &DataHeader, pos: u64) -> crate::error::Result<u64> {
    if d.tloc != tpos {
        return Err(corrupt(
            pos,
            format!(
                "data record does not point to transaction header: {} != {tpos}",
                d.tloc
            ),
        ));
    }
    let len = d
        .record_len()
        .filter(|&l| pos.checked_add(l).is_some_and(|e| e <= tend))
        .ok_or_else(|| corrupt(pos, "data record size exceeds transaction size"))?;
    if d.prev >= pos {
        return Err(corrupt(
            pos,
            format!("invalid previous pointer: {}", d.prev),
        ));
    }
    if d.back != 0 && d.back >= pos {
        return Err(corrupt(pos, format!("invalid back pointer: {}", d.back)));
    }
    if d.vlen != 0 {
        return Err(corrupt(pos, "data record with a version"));
    }
    Ok(len)
}

/// Calls `f(tpos, header, record position, data header)` for every data record of every
/// transaction in `[from, to)`, running pack's checks; `stop_after` ends the scan at the
/// first transaction later than it. Returns where the scan stopped and whether every
/// transaction seen had status `'p'`.
fn scan_records(
    r: &mut SeqReader<'_>,
    from: u64,
    to: u64,
    stop_after: Option<Tid>,
    ltid: &mut Tid,
    progress: &dyn Progress,
    mut f: impl FnMut(u64, &TxnHeader, u64, &DataHeader) -> crate::error::Result<()>,
) -> crate::error::Result<(u64, bool)> {
    let mut pos = from;
    let mut all_packed = true;
    while pos < to {
        progress.update(pos);
        let h = r.txn_header(pos)?;
        if stop_after.is_some_and(|t| h.tid > t) {
            break;
        }
        check_txn(&h, pos, ltid, to)?;
        if h.status != status::PACKED {
            all_packed = false;
        }
        let tend = pos + h.tlen;
        let mut p = pos + h.header_len();
        while p < tend {
            let d = r
                .data_header(p, tend)?
                .ok_or_else(|| corrupt(p, "data record size exceeds transaction size"))?;
            let len = check_data(pos, tend, &d, p)?;
            f(pos, &h, p, &d)?;
            p += len;
        }
        let tl = r.u64_at(tend)?;
        if tl != h.tlen {
            return Err(corrupt(
                tend,
                format!(
                    "redundant transaction length does not match initial transaction length: {tl} != {}",
                    h.tlen
                ),
            ));
        }
        pos = tend + 8;
    }
    Ok((pos, all_packed))
}

/// The references of the revision at `pos` (back pointers chased to the pickle).
fn refs_at(
    view: &FileView,
    scanner: &mut RefScanner,
    oid: Oid,
    pos: u64,
    out: &mut Vec<Oid>,
) -> Result<(), String> {
    let data = view.resolve(oid, pos).map_err(|e| e.to_string())?;
    if let Some((data, at)) = data {
        scanner
            .references(&data, out)
            .map_err(|e| format!("reading the references of oid {oid} at {at}: {e}"))?;
    }
    Ok(())
}

/// `findReachableAtPacktime`: marks everything reachable from `todo` (oids) at the pack
/// time. A reference to an object that does not exist then fails the pack, as in Python.
fn mark_from(
    view: &FileView,
    scanner: &mut RefScanner,
    curpos: &Index,
    extra: &HashMap<Oid, Vec<u64>>,
    marked: &mut HashSet<Oid>,
    mut todo: Vec<Oid>,
    progress: &dyn Progress,
) -> Result<()> {
    let mut refs = Vec::new();
    while let Some(oid) = todo.pop() {
        if marked.contains(&oid) {
            continue;
        }
        if marked.len().is_multiple_of(1024) {
            progress.update(marked.len() as u64);
        }
        let Some(pos) = curpos.get(oid) else {
            if oid == Oid::ROOT && curpos.is_empty() {
                // Packing to a time before the root existed.
                continue;
            }
            if extra.contains_key(&oid) {
                // No state at the pack time, but revisions that undo after it brings
                // back are kept (their references are followed as extra roots).
                continue;
            }
            tracing::error!(%oid, "pack: a reachable object references {oid}, which does not exist at the pack time");
            return Err(StorageError::PosKey(oid));
        };
        marked.insert(oid);
        refs.clear();
        refs_at(view, scanner, oid, pos, &mut refs).map_err(StorageError::Corrupted)?;
        todo.extend(refs.iter().filter(|o| !marked.contains(o)));
    }
    Ok(())
}

/// Phase 1: what to keep from before the pack time. `None` for a redundant pack.
pub(super) fn find_reachable(
    view: &FileView,
    pack_time: Tid,
    gc: bool,
    name: &str,
    progress: &dyn Progress,
) -> Result<Option<Gc>> {
    let err = |e: Error| e.in_storage(name);
    progress.start("packing: reading to the pack time", Unit::Bytes, view.end());
    let mut r = SeqReader::new(&*view.io, view.end());
    let mut curpos = Index::new();
    let mut ltid = Tid::ZERO;
    // A transaction's records are applied together, sorted by oid (see
    // `Index::insert_batch`); `None` removes the oid (a record without state).
    let mut txn: Vec<(Oid, Option<u64>)> = Vec::new();
    let mut txn_pos = 0;
    let apply = |txn: &mut Vec<(Oid, Option<u64>)>, curpos: &mut Index| {
        txn.sort_by_key(|e| e.0);
        for &(oid, pos) in txn.iter() {
            match pos {
                Some(p) => curpos.insert(oid, p),
                None => {
                    curpos.remove(oid);
                }
            }
        }
        txn.clear();
    };
    let (packpos, all_packed) = scan_records(
        &mut r,
        FIRST_TXN_POS,
        view.end(),
        Some(pack_time),
        &mut ltid,
        progress,
        |tpos, _, pos, d| {
            if tpos != txn_pos {
                apply(&mut txn, &mut curpos);
                txn_pos = tpos;
            }
            txn.push((d.oid, (d.plen > 0 || d.back != 0).then_some(pos)));
            Ok(())
        },
    )
    .map_err(err)?;
    apply(&mut txn, &mut curpos);
    if all_packed && packpos < view.end() {
        let next = r.txn_header(packpos).map_err(err)?;
        if next.status == status::PACKED {
            return Ok(None);
        }
    }
    progress.finish();
    let mut scanner = RefScanner::new();
    let mut marked = gc.then(HashSet::new);
    if let Some(m) = &mut marked {
        // At most every object is reachable: the total is an upper bound.
        progress.start(
            "packing: finding reachable objects",
            Unit::Objects,
            curpos.len() as u64,
        );
        mark_from(
            view,
            &mut scanner,
            &curpos,
            &HashMap::new(),
            m,
            vec![Oid::ROOT],
            progress,
        )?;
        progress.finish();
    }
    // findReachableFromFuture: revisions before the pack time that back pointers after it
    // bring back are kept, with what they reference.
    let mut extra: HashMap<Oid, Vec<u64>> = HashMap::new();
    let mut extra_roots: Vec<(Oid, u64)> = Vec::new();
    let mut back_targets = HashSet::new();
    progress.start(
        "packing: reading after the pack time",
        Unit::Bytes,
        view.end(),
    );
    progress.update(packpos);
    scan_records(
        &mut r,
        packpos,
        view.end(),
        None,
        &mut ltid,
        progress,
        |_, _, _, d| {
            if d.back != 0 {
                back_targets.insert(d.back);
            }
            if d.back != 0 && d.back < packpos {
                let kept = curpos.get(d.oid) == Some(d.back)
                    && marked.as_ref().is_none_or(|m| m.contains(&d.oid));
                let l = extra.entry(d.oid).or_default();
                if !kept && !l.contains(&d.back) {
                    l.push(d.back);
                    extra_roots.push((d.oid, d.back));
                }
            }
            Ok(())
        },
    )
    .map_err(err)?;
    progress.finish();
    if let Some(m) = &mut marked {
        let mut refs = Vec::new();
        for (oid, pos) in extra_roots {
            refs.clear();
            refs_at(view, &mut scanner, oid, pos, &mut refs).map_err(StorageError::Corrupted)?;
            mark_from(
                view,
                &mut scanner,
                &curpos,
                &extra,
                m,
                refs.clone(),
                &NoProgress,
            )?;
        }
    }
    Ok(Some(Gc {
        curpos,
        marked,
        extra,
        packpos,
        back_targets,
    }))
}
